"""The node's command line: build a Node from flags, run it until Ctrl-C or SIGTERM.

    python3 node.py [--host localhost] [--port 12345] [--rpc-url URL] [--data-dir DIR]
                    [--cluster nats://HOST:PORT[,...]]
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from dm import datadir
from dm.chain import devchain, ethereum
from dm.chain.faucet import Faucet, faucet_signer, fund_user
from dm.relay.bounties import LOOKUPS_PER_SECOND, BountyIndex
from dm.relay.node import Node


def build_node(args) -> tuple[Node, "devchain.Anvil | None"]:
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
                    redeemer_options={"batch_size": args.batch_size, "batch_wait": args.batch_wait},
                    cluster_options=cluster_options(args))
    except BaseException:
        devchain.stop_on_exit(anvil)
        raise
    return node, anvil


def cluster_options(args) -> dict | None:
    """--cluster nats://HOST:PORT[,...]: join the network of nodes on those NATS servers."""
    if not args.cluster:
        return None
    servers = [url.strip() for url in args.cluster.split(",") if url.strip()]
    return {"servers": servers, "replicas": args.cluster_replicas, "timeout": args.cluster_timeout,
            "max_in_flight": args.cluster_max_in_flight}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="DistributedMessaging relay node: relays ciphertext, "
                                     "earns 1 BTK per delivered message.")
    parser.add_argument("--host", default="localhost", help="interface to listen on (default: localhost)")
    parser.add_argument("--port", type=int, default=12345, help="TCP port (default: 12345; 0 picks a free one)")
    parser.add_argument("--rpc-url", default=os.environ.get("DM_RPC_URL", ethereum.DEFAULT_RPC_URL),
                        help="Ethereum JSON-RPC URL; on loopback, anvil is started when nothing answers "
                             "(default: $DM_RPC_URL or %(default)s)")
    parser.add_argument("--data-dir", help=f"data directory (default: ${datadir.ENV_VAR} or {datadir.DEFAULT})")
    parser.add_argument("--batch-size", type=int, default=50, help="redeem when this many codes are queued")
    parser.add_argument("--batch-wait", type=float, default=1.0,
                        help="redeem queued codes at the latest this many seconds after the first arrived")
    parser.add_argument("--max-connections", type=int, default=10_000)
    parser.add_argument("--lookups", type=float, default=LOOKUPS_PER_SECOND, metavar="N",
                        help="direct chain lookups per second of bounties the node has not seen yet; past it, "
                             "unknown bounties wait for the event index (default: %(default)g)")
    parser.add_argument("--cluster", metavar="nats://HOST:PORT[,...]",
                        help="join a network of nodes over these NATS servers (JetStream on); without it the "
                             "node works alone")
    parser.add_argument("--cluster-replicas", type=int, default=None, metavar="N",
                        help="JetStream replicas of the shared pins, channels and forwarded codes (default: "
                             "the number of NATS servers, at most 3)")
    parser.add_argument("--cluster-timeout", type=float, default=2.0, metavar="SECONDS",
                        help="how long to wait for another node or NATS before a message counts as offline "
                             "(default: %(default)g)")
    parser.add_argument("--cluster-max-in-flight", type=int, default=10_000, metavar="N",
                        help="messages to users on other nodes that may wait for an answer at once; past it the "
                             "sender waits, up to --cluster-timeout (default: %(default)s)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        node, anvil = build_node(args)
    except (ethereum.ChainError, datadir.DataError, OSError) as exc:
        print(f"node: {exc}", file=sys.stderr)
        return 1
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        node.start()
    except Exception as exc:
        if type(exc).__name__ != "ClusterUnavailable":  # dm.cluster is imported only with --cluster
            raise
        print(f"node: {exc}", file=sys.stderr)
        node.stop()
        devchain.stop_on_exit(anvil)
        return 1
    print(f"node ready on {args.host}:{node.port}", flush=True)
    done.wait()
    node.stop()
    devchain.stop_on_exit(anvil)
    return 0


if __name__ == "__main__":
    sys.exit(main())
