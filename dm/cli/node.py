"""The node's command line: build a Node from flags, run it until Ctrl-C, SIGTERM or SIGHUP.

    python3 node.py [--host localhost] [--port 12345] [--rpc-url URL] [--data-dir DIR]
                    [--cluster nats://HOST:PORT[,...]]
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
import threading

from dm import datadir, wire
from dm.chain import DEFAULT_RPC_URL
from dm.cli.where import NODE_PORT, chain_hint
from dm.relay import (CPU_SHARE, DEV_CONFIRMATIONS, ERROR_WINDOW, LOOKUPS_PER_SECOND, MAX_BOOKS_PER_USER,
                      REAL_CONFIRMATIONS, TESTER_CONFIRMATIONS)
from dm.relay.budget import IP_CPU_SHARE, MAX_BUDGETS, NEW_NAMES_PER_HOUR
from dm.relay.channels import MAX_CHANNELS_PER_USER, MAX_MEMBERS
from dm.relay.ledger import MAX_UNCLAIMED
from dm.relay.pins import MAX_PINS
from dm.relay.presence import MAX_WATCHES
from dm.cluster import CLAIMS_MAX_AGE, CLAIMS_MAX_PER_NODE  # constants only: nats is not loaded

# web3 and the node are imported inside the functions below, so that --help answers at once.


def build_node(args):
    """(Node, the Anvil we started or None)."""
    from dm.chain import devchain, ethereum
    from dm.chain.faucet import Faucet, faucet_signer, fund_user
    from dm.relay.bounties import BountyIndex
    from dm.relay.node import Node

    data_dir = datadir.resolve(args.data_dir)
    w3, anvil = devchain.ensure_chain(args.rpc_url, data_dir)
    try:
        token, deployment = devchain.ensure_deployment(w3, args.rpc_url, data_dir)
        key = datadir.ensure_secret(data_dir / "node" / "node_ETH.key", lambda: ethereum.new_account()[1])
        signer = ethereum.Signer(w3, key)
        dev_faucet = None
        if ethereum.is_dev_chain(w3):
            dev_faucet = Faucet(token, faucet_signer(w3, data_dir))
            fund_user(token, dev_faucet.signer, signer.address, btk=0)
        index = BountyIndex(token, signer.address, books_dir=data_dir / "node" / "books",
                            from_block=deployment.deploy_block, lookups_per_second=args.lookups)
        node = Node(token=token, signer=signer, data_dir=data_dir, index=index, faucet=dev_faucet,
                    host=args.host, port=args.port, max_connections=args.max_connections,
                    max_watches=args.max_watches,
                    claim_timeout=args.claim_timeout, max_unclaimed=args.max_unclaimed,
                    max_errors=args.max_errors, error_window=args.error_window, max_books=args.max_books,
                    max_book_leaves=args.max_book_leaves, max_channels=args.max_channels,
                    max_members=args.max_members, cpu_share=args.cpu_share, ip_cpu_share=args.ip_cpu_share,
                    max_budgets=args.max_budgets, max_visible=args.max_visible, max_pins=args.max_pins,
                    new_names_per_hour=args.new_names_per_hour,
                    redeemer_options={"batch_size": args.batch_size, "batch_wait": args.batch_wait,
                                      "confirmations": args.confirmations},
                    cluster_options=cluster_options(args))
    except BaseException:
        devchain.stop_on_exit(anvil)
        raise
    return node, anvil


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of blocks, 1 or more (got {text!r})")
    return value


def _positive(kind, zero: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value >= 0 if zero else value > 0):
            raise argparse.ArgumentTypeError(f"must be {'0 or more' if zero else 'above 0'}, not {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port: give 1-65535, or 0 for a free one")
    return value


def cluster_options(args) -> dict | None:
    """--cluster nats://HOST:PORT[,...]: join the network of nodes on those NATS servers."""
    if not args.cluster:
        return None
    servers = [url.strip() for url in args.cluster.split(",") if url.strip()]
    return {"servers": servers, "replicas": args.cluster_replicas, "timeout": args.cluster_timeout,
            "max_in_flight": args.cluster_max_in_flight, "claims_max_age": args.cluster_claims_max_age,
            "claims_max": args.cluster_claims_max}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="DistributedMessaging relay node: relays ciphertext, "
                                     "earns 1 BTK per delivered message.")
    parser.add_argument("--host", default="localhost", help="interface to listen on (default: localhost)")
    parser.add_argument("--port", type=_port, default=NODE_PORT,
                        help="TCP port (default: %(default)s; 0 picks a free one)")
    parser.add_argument("--rpc-url", default=os.environ.get("DM_RPC_URL", DEFAULT_RPC_URL),
                        help="Ethereum JSON-RPC URL; on loopback, anvil is started when nothing answers "
                             "(default: $DM_RPC_URL or %(default)s)")
    parser.add_argument("--data-dir", help=f"data directory (default: ${datadir.ENV_VAR} or {datadir.DEFAULT})")
    parser.add_argument("--batch-size", type=_positive(int), default=50, help="redeem when this many codes are queued")
    parser.add_argument("--batch-wait", type=_positive(float), default=1.0,
                        help="redeem queued codes at the latest this many seconds after the first arrived")
    parser.add_argument("--confirmations", type=_at_least_one, default=None, metavar="N",
                        help="a redemption is final (its codes leave the journal, the sender is told `paid`) once "
                             f"its block is N deep, counting its own (default: {DEV_CONFIRMATIONS} on a local anvil "
                             f"chain, {TESTER_CONFIRMATIONS} on eth-tester, {REAL_CONFIRMATIONS} on any other chain)")
    parser.add_argument("--max-connections", type=_positive(int), default=10_000, metavar="N",
                        help="connections open at once; past it a new one is told `busy` (default: %(default)d)")
    parser.add_argument("--lookups", type=_positive(float, zero=True), default=LOOKUPS_PER_SECOND, metavar="N",
                        help="direct chain lookups per second of bounties the node has not seen yet; past it, "
                             "unknown bounties wait for the event index (default: %(default)g)")
    parser.add_argument("--max-watches", type=_positive(int), default=MAX_WATCHES, metavar="N",
                        help="names one user may watch for presence at a time; past it `watch` is refused "
                             "with watch_limit (default: %(default)d)")
    limits = parser.add_argument_group("limits per user (each refusal says which limit it hit)")
    limits.add_argument("--claim-timeout", type=_positive(float), default=3600, metavar="SECONDS",
                        help="how long a delivered message waits for its code before the node forgets it "
                             "(default: %(default)g)")
    limits.add_argument("--max-unclaimed", type=_positive(int), default=MAX_UNCLAIMED, metavar="N",
                        help="delivered messages a user may have waiting for their codes at once, as sender and "
                             "as recipient; past it sends are refused with unclaimed_limit. Honest clients return "
                             "codes within seconds, so %(default)d is minutes of traffic, and it bounds what a "
                             "recipient that never pays (or a colluding pair) gets for free (default: %(default)d)")
    limits.add_argument("--max-errors", type=_positive(int), default=20, metavar="N",
                        help="refusals within --error-window that close a connection; counted per user over all "
                             "its connections, so reconnecting does not reset them (default: %(default)d)")
    limits.add_argument("--error-window", type=_positive(float), default=ERROR_WINDOW, metavar="SECONDS",
                        help="the sliding window --max-errors counts over; answered frames in between do not "
                             "reset it (default: %(default)g)")
    limits.add_argument("--max-books", type=_positive(int), default=MAX_BOOKS_PER_USER, metavar="N",
                        help="unexpired books a user may have announced at once (default: %(default)d)")
    limits.add_argument("--max-book-leaves", type=_positive(int), default=wire.MAX_BOOK_LEAVES, metavar="N",
                        help="leaves in one `book` frame; the reference client makes books of at most "
                             f"{wire.MAX_BOOK_LEAVES} (default: %(default)d)")
    limits.add_argument("--max-channels", type=_positive(int), default=MAX_CHANNELS_PER_USER, metavar="N",
                        help="channels a user may be in at once (default: %(default)d)")
    limits.add_argument("--max-members", type=_positive(int), default=MAX_MEMBERS, metavar="N",
                        help="members of one channel; each channel line is one paid copy per member "
                             "(default: %(default)d)")
    limits.add_argument("--max-visible", type=_positive(int), default=wire.MAX_VISIBLE, metavar="BYTES",
                        help="bytes of a relayed message its recipient can read before it returns the code (all "
                             "but the sealed text: keys, signature, ids); it bounds what a colluding pair passes "
                             "unpaid. A message of RSA-2048 keys needs about 1,200, one of RSA-4096 keys to a "
                             "1,000-member channel about 2,400; past it a send is refused bad_field "
                             "(default: %(default)d)")
    limits.add_argument("--cpu-share", type=_positive(float, zero=True), default=CPU_SHARE, metavar="FRACTION",
                        help="CPU one user may use on frames other than plain sends (handshakes, books, "
                             "lookups), as a share of a core, over all its connections and across reconnects; past it "
                             "its connections wait, so others go first. 0 turns pacing off (default: %(default)g)")
    limits.add_argument("--ip-cpu-share", type=_positive(float, zero=True), default=IP_CPU_SHARE, metavar="FRACTION",
                        help="the same, for everything that comes from one IP address (an IPv6 /64), handshakes "
                             "included; wide, since many honest users may share an address. Behind a proxy, where "
                             "every client has the proxy's address, use 0 (default: %(default)g)")
    limits.add_argument("--new-names-per-hour", type=_positive(int, zero=True), default=NEW_NAMES_PER_HOUR,
                        metavar="N", help="new names one IP address (an IPv6 /64) may pin, or move to another "
                        "account, an hour, as many at once: 100 fits a class signing up behind one NAT and holds a "
                        "script to 2,400 a day. Past it such an auth gets limit_reached; a pinned name with its "
                        "account always logs in. 0: off, for behind a proxy (default: %(default)d)")
    limits.add_argument("--max-pins", type=_positive(int), default=MAX_PINS, metavar="N",
                        help="names pinned in all, each up to ~1.2 KB of memory and ~0.9 KB of disk (bench/pins.py); "
                             "past it a new name's auth gets limit_reached, pinned names log in (default: %(default)d)")
    limits.add_argument("--max-budgets", type=_positive(int), default=MAX_BUDGETS, metavar="N",
                        help="addresses and users whose CPU use and refusals the node remembers; past it the least "
                             "recently seen is forgotten (default: %(default)d)")
    parser.add_argument("--cluster", metavar="nats://HOST:PORT[,...]",
                        help="join a network of nodes over these NATS servers (JetStream on); without it the "
                             "node works alone")
    parser.add_argument("--cluster-replicas", type=_positive(int), default=None, metavar="N",
                        help="JetStream replicas of the shared pins, channels and forwarded codes (default: "
                             "the number of NATS servers, at most 3)")
    parser.add_argument("--cluster-timeout", type=_positive(float), default=2.0, metavar="SECONDS",
                        help="how long to wait for another node or NATS before a message counts as offline "
                             "and a login, join or lookup is refused with unavailable (default: %(default)g)")
    parser.add_argument("--cluster-max-in-flight", type=_positive(int), default=10_000, metavar="N",
                        help="messages to users on other nodes that may wait for an answer at once; past it the "
                             "sender waits, up to --cluster-timeout, then gets offline (default: %(default)s)")
    parser.add_argument("--cluster-claims-max-age", type=_positive(float), default=CLAIMS_MAX_AGE,
                        metavar="SECONDS",
                        help="how long a code returned here waits to be stored for the sender's node, and then "
                             "waits in the network's stream for that node to take it; older codes are dropped. "
                             "The default is the reference client's bounty lifetime: an older code opens an "
                             "expired bounty (default: %(default)g)")
    parser.add_argument("--cluster-claims-max", type=_positive(int), default=CLAIMS_MAX_PER_NODE, metavar="N",
                        help="codes the network's stream holds for one node (one that is down); past it new "
                             "codes wait in the journal of the node they were returned at until there is room "
                             "(default: %(default)d)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        check_port_free(args.host, args.port)  # before the chain work, which takes seconds
    except OSError as exc:
        print(f"node: {explain_os_error(exc, args)}", file=sys.stderr)
        return 1
    try:
        lock = lock_data_dir(datadir.resolve(args.data_dir))  # held until this process ends
    except datadir.DataError as exc:
        print(f"node: {exc}", file=sys.stderr)
        return 1
    from dm.chain import devchain, ethereum

    def interrupt(*_):
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):  # while starting, `kill` or a closed terminal acts as Ctrl-C
        signal.signal(sig, interrupt)
    try:
        node, anvil = build_node(args)
    except OSError as exc:
        print(f"node: {explain_os_error(exc, args)}", file=sys.stderr)
        return 1
    except ethereum.ChainError as exc:
        print(f"node: {exc}; {chain_hint(args.rpc_url)}", file=sys.stderr)
        return 1
    except datadir.DataError as exc:
        print(f"node: {exc}", file=sys.stderr)
        return 1
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a closed terminal stops the node as `kill` does
        signal.signal(sig, lambda *_: done.set())
    try:
        return serve(node, args, done)
    finally:
        devchain.stop_on_exit(anvil)  # only a chain this node started
        lock.close()


def lock_data_dir(data_dir):
    """One node per data directory: two would share the node id, the account (and its nonces),
    the journal and the pins. The lock is DATA/node/node.lock."""
    try:
        return datadir.hold_lock(data_dir / "node" / "node.lock")
    except datadir.Locked as locked:
        pid = f" (pid {locked.pid})" if locked.pid else ""
        raise datadir.DataError(f"another node uses this data directory, {data_dir}{pid}: stop it first, or give "
                                "this one its own --data-dir") from None


def serve(node, args, done: threading.Event) -> int:
    """Runs the node until `done` is set."""
    try:
        node.start()
    except Exception as exc:
        if type(exc).__name__ != "ClusterUnavailable":  # dm.cluster is imported only with --cluster
            raise
        print(f"node: {exc}", file=sys.stderr)
        node.stop()
        return 1
    print(f"node ready on {args.host}:{node.port}", flush=True)
    done.wait()
    node.stop()
    return 0


def check_port_free(host: str, port: int) -> None:
    """Raises the OSError that listening on host:port would raise (with port 0: whether host is ours)."""
    socket.create_server((host, port)).close()


def explain_os_error(exc: OSError, args) -> str:
    """An OSError from starting the node, with what to do about it."""
    if exc.errno == errno.EADDRINUSE:
        return (f"port {args.port} on {args.host} is already in use: another node (or program) is running on "
                f"port {args.port}; stop it, or start this one with --port N (--port 0 picks a free port)")
    if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or (exc.errno or 0) < 0:  # < 0: getaddrinfo's
        reason = (exc.strerror or str(exc)).split(" (while attempting")[0]
        return (f"cannot listen on {args.host}: {reason}; give --host a name or address of this machine "
                "(localhost, 127.0.0.1, or 0.0.0.0 for every interface)")
    if exc.errno == errno.EACCES:
        return f"not allowed to listen on port {args.port}: {exc.strerror}; use a port above 1023 with --port"
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
