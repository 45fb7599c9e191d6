"""The client's command line.

    python3 client.py HOST PORT ME PEER      e.g. python3 client.py localhost 12345 user_1 user_2
"""
from __future__ import annotations

import argparse
import os
import sys

from dm import datadir, wire
from dm.chain import ethereum
from dm.client.core import ClientError
from dm.client.terminal import check_channel, run


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="DistributedMessaging client: end-to-end encrypted, paid relay.")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("me", help="your name (keys from `python3 main.py Y NAME`)")
    parser.add_argument("peer", help="who to talk to: a name, or a #channel")
    parser.add_argument("--data-dir", help=f"data directory (default: ${datadir.ENV_VAR} or {datadir.DEFAULT})")
    parser.add_argument("--rpc-url", default=os.environ.get("DM_RPC_URL", ethereum.DEFAULT_RPC_URL),
                        help="your own connection to the chain (default: $DM_RPC_URL or %(default)s)")
    parser.add_argument("--pay", choices=["book", "single"], default="book",
                        help="book: prepay codes in bulk (default); single: one registerBounty per message")
    parser.add_argument("--book-size", type=int, default=100, help=f"codes per prepaid book, at most {wire.MAX_BOOK_LEAVES} (default: 100)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        datadir.check_name(args.me)
        check_channel(args.peer) if args.peer.startswith("#") else datadir.check_name(args.peer)
        if not 1 <= args.book_size <= wire.MAX_BOOK_LEAVES:  # a node takes at most this many leaves per book
            raise ClientError(f"--book-size must be 1 to {wire.MAX_BOOK_LEAVES}")
        return run(args)
    except (ClientError, datadir.DataError, ethereum.ChainError) as exc:
        print(f"client: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
