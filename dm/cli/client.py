"""The client's command line.

    python3 client.py HOST PORT ME PEER      e.g. python3 client.py localhost 12345 user_1 user_2
    python3 client.py HOST PORT ME PEER --node HOST2:PORT2   another node to fall back on
"""
from __future__ import annotations

import argparse
import os
import sys

from dm import datadir
from dm.chain import ethereum
from dm.client.core import RECONNECT_FOR, RECONNECT_MAX_DELAY, ClientError
from dm.client.terminal import check_channel, run


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="DistributedMessaging client: end-to-end encrypted, paid relay.")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("me", help="your name (keys from `python3 main.py Y NAME`)")
    parser.add_argument("peer", help="who to talk to: a name, or a #channel")
    parser.add_argument("--node", action="append", default=[], type=node_address, metavar="HOST:PORT",
                        help="another node address to try when the connection drops (repeatable; "
                             "tried in turn after HOST PORT)")
    parser.add_argument("--reconnect-for", type=float, default=RECONNECT_FOR, metavar="SECONDS",
                        help="keep trying to reconnect this long before giving up; 0: do not reconnect "
                             "(default: %(default)g)")
    parser.add_argument("--reconnect-max-delay", type=float, default=RECONNECT_MAX_DELAY, metavar="SECONDS",
                        help="the longest pause between two rounds of reconnect tries (default: %(default)g)")
    parser.add_argument("--data-dir", help=f"data directory (default: ${datadir.ENV_VAR} or {datadir.DEFAULT})")
    parser.add_argument("--rpc-url", default=os.environ.get("DM_RPC_URL", ethereum.DEFAULT_RPC_URL),
                        help="your own connection to the chain (default: $DM_RPC_URL or %(default)s)")
    parser.add_argument("--pay", choices=["book", "single"], default="book",
                        help="book: prepay codes in bulk (default); single: one registerBounty per message")
    parser.add_argument("--book-size", type=int, default=100, help="codes per prepaid book (default: 100)")
    args = parser.parse_args(argv)
    args.addresses = [(args.host, args.port), *args.node]
    return args


def node_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (for example localhost:12346)")
    return host.strip("[]"), int(port)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        datadir.check_name(args.me)
        check_channel(args.peer) if args.peer.startswith("#") else datadir.check_name(args.peer)
        if args.book_size < 1:
            raise ClientError("--book-size must be at least 1")
        if args.reconnect_for < 0 or args.reconnect_max_delay <= 0:
            raise ClientError("--reconnect-for must be 0 or more, --reconnect-max-delay more than 0")
        return run(args)
    except (ClientError, datadir.DataError, ethereum.ChainError) as exc:
        print(f"client: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
