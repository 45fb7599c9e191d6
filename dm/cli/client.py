"""The client's command line.

    python3 client.py HOST PORT ME PEER      e.g. python3 client.py localhost 12345 user_1 user_2
    python3 client.py HOST PORT ME PEER --node HOST2:PORT2   another node to fall back on

Imports only the standard library and dm's light modules until the arguments are
checked, so that --help and argument errors answer at once.
"""
from __future__ import annotations

import argparse
import socket
import sys

from dm import datadir, wire
from dm.chain import DEFAULT_RPC_URL
from dm.cli.where import chain_url, start_node
from dm.client.commands import check_target
from dm.client.connection import RECONNECT_FOR, RECONNECT_MAX_DELAY, RELEASE_TIMEOUT
from dm.client.errors import ClientError


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
    parser.add_argument("--rpc-url", help="your own connection to the chain (default: $DM_RPC_URL, else the "
                                          f"chain in the data directory's deployment.json, else {DEFAULT_RPC_URL})")
    parser.add_argument("--pay", choices=["book", "single"], default="book",
                        help="book: prepay codes in bulk (default); single: one registerBounty per message")
    parser.add_argument("--book-size", type=int, default=100,
                        help=f"codes per prepaid book, at most {wire.MAX_BOOK_LEAVES} (default: 100)")
    parser.add_argument("--release-timeout", type=float, default=RELEASE_TIMEOUT,
                        help="seconds to wait for the node's key after returning a code before telling you "
                             "the node kept it (default: %(default)g)")
    args = parser.parse_args(argv)
    args.addresses = [(args.host, args.port), *args.node]
    return args


def node_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (for example localhost:12346)")
    return host.strip("[]"), int(port)


def resolve_rpc_url(args) -> None:
    """Sets args.rpc_url and args.rpc_source: the flag, $DM_RPC_URL, the chain this data directory's
    deployment was recorded on (where the node that made it pays), or the default."""
    args.rpc_url, args.rpc_source = chain_url(args.rpc_url, datadir.resolve(args.data_dir))


def probe_node(addresses: list[tuple[str, int]], timeout: float = 10) -> None:
    """Fails fast, before the seconds of importing web3, when nothing listens at any of the addresses."""
    for host, port in addresses:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            return
        except OSError as exc:
            problem = f"{host}:{port}: {exc.strerror or exc}"
    where = "the node at" if len(addresses) == 1 else "any node; the last,"
    raise ClientError(f"cannot reach {where} {problem}: is node.py running there? "
                      f"Start it first (`{start_node(addresses[0][1])}`), or check the host and port") from None


def lock_client_dir(data_dir, name: str):
    """One client.py per name and data directory: two would spend the same book leaves and
    rewrite each other's outbox. The lock is DATA/clients/NAME/client.lock; another data
    directory (another machine) may log the name in, and the node keeps the newer session."""
    try:
        return datadir.hold_client_lock(data_dir, name)
    except datadir.Locked as locked:
        pid = f" (pid {locked.pid})" if locked.pid else ""
        raise ClientError(f"{name} is already running from {data_dir}{pid}: use that one, or quit it (exit) first")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        datadir.check_name(args.me)
        args.peer = check_target(args.peer)
        if not 1 <= args.book_size <= wire.MAX_BOOK_LEAVES:  # a node takes at most this many leaves per book
            raise ClientError(f"--book-size must be 1 to {wire.MAX_BOOK_LEAVES}")
        if args.reconnect_for < 0 or args.reconnect_max_delay <= 0:
            raise ClientError("--reconnect-for must be 0 or more, --reconnect-max-delay more than 0")
        if not args.release_timeout > 0:
            raise ClientError("--release-timeout must be a positive number of seconds")
        if not 0 < args.port < 65536:
            raise ClientError(f"port {args.port} is not a TCP port: give the node's port (node.py's default is 12345)")
        if not datadir.private_key_path(datadir.resolve(args.data_dir), args.me).exists():
            raise ClientError(f"no keys for {args.me!r} in {datadir.resolve(args.data_dir)}: run "
                              f"`python3 main.py Y {args.me}` first")
        lock = lock_client_dir(datadir.resolve(args.data_dir), args.me)
        try:
            resolve_rpc_url(args)
            probe_node(args.addresses)
            from dm.client.terminal import run

            return run(args)
        finally:
            lock.close()
    except (ClientError, datadir.DataError) as exc:
        print(f"client: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
