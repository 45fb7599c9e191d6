"""Keys, accounts, the chain, and the demo.

    python3 main.py Y NAME...        RSA key pair + Ethereum account for each name (the original's form)
    python3 main.py info [--json]    the deployment, and each known user's address and BTK balance
    python3 main.py chain            run the local chain (anvil) with BountyToken deployed, until Ctrl-C
    python3 main.py refund NAME      take back NAME's expired, unspent bounty books
    python3 main.py demo             a node and two scripted clients on the local chain
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

from dm import datadir
from dm.chain import DEFAULT_RPC_URL
from dm.cli import where

# crypto, web3 and the chain are imported inside the functions, so that --help answers at once.


def gather_info(data_dir: Path, rpc_url: str, rpc_source: str = "--rpc-url") -> dict:
    from dm import crypto
    from dm.chain import devchain, ethereum
    from dm.cli.accounts import unspent_in_books

    record = devchain.load_deployment(data_dir)
    info: dict = {"data_dir": str(data_dir), "rpc_url": rpc_url, "rpc_source": rpc_source,
                  "deployment": record.to_json() if record else None, "users": [], "node": None}
    token = None
    if record:
        w3 = ethereum.connect(rpc_url)
        if ethereum.is_connected(w3) and w3.eth.chain_id == record.chain_id:
            candidate = ethereum.BountyToken(w3, record.address)
            if candidate.is_genuine():
                token = candidate
        info["chain_reachable"] = token is not None
    accounts = [(name, ethereum.address_of(datadir.read_eth_key(datadir.eth_key_path(data_dir, name))))
                for name in datadir.known_users(data_dir) if datadir.eth_key_path(data_dir, name).exists()]
    for name, address in accounts:
        user = {"name": name, "eth_address": address,
                "fingerprint": crypto.fingerprint(crypto.load_public_key(datadir.public_key_path(data_dir, name)))}
        if token:
            wei = token.balance_of(address)
            user["btk"], user["btk_wei"] = wei / ethereum.TOKEN, wei
            user["escrowed_in_books"] = unspent_in_books(token, data_dir, name)
        info["users"].append(user)
    node_key = data_dir / "node" / "node_ETH.key"
    if node_key.exists():
        address = ethereum.address_of(datadir.read_eth_key(node_key))
        info["node"] = {"eth_address": address, **({"btk": token.balance_of(address) / ethereum.TOKEN} if token else {})}
    return info


def print_info(info: dict) -> None:
    print(f"data directory: {info['data_dir']}")
    record = info["deployment"]
    if record is None:
        print(f"deployment:     none yet (run `{where.start_chain(info['rpc_url'])}` or start the node)")
    else:
        state = "" if info.get("chain_reachable") else f"   (chain not reachable now: {where.chain_hint(info['rpc_url'])})"
        print(f"chain id:       {record['chain_id']}{state}")
        print(f"RPC URL:        {info['rpc_url']}" + ("" if info["rpc_url"] == record["rpc_url"] else
                                                      f" (from {info['rpc_source']}; deployed on {record['rpc_url']})"))
        print(f"BountyToken:    {record['address']} (deployed in block {record['deploy_block']})")
    if info["node"]:
        btk = f"  {info['node']['btk']:g} BTK" if "btk" in info["node"] else ""
        print(f"node account:   {info['node']['eth_address']}{btk}")
    for user in info["users"]:
        balance = f"  {user['btk']:g} BTK" if "btk" in user else ""
        escrow = f" (+{user['escrowed_in_books']:g} escrowed in open books)" if user.get("escrowed_in_books") else ""
        print(f"{user['name']:<15} {user['eth_address']}{balance}{escrow}")
    if not info["users"]:
        print("no users yet: run `python3 main.py Y NAME...`")


def run_chain(data_dir: Path, rpc_url: str) -> int:
    import signal

    from dm.chain import devchain

    def interrupt(*_):
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):  # `kill` or a closed terminal stops anvil too, as Ctrl-C does
        signal.signal(sig, interrupt)
    w3, anvil = devchain.ensure_chain(rpc_url, data_dir)
    try:
        token, record = devchain.ensure_deployment(w3, rpc_url, data_dir)
        print(json.dumps(record.to_json(), indent=1))
        if anvil is None:
            print("a chain was already running there; nothing more to do")
            return 0
        print("local chain running; Ctrl-C stops it (its state is kept in the data directory)", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        devchain.stop_on_exit(anvil)
    return 0


def refund_books(data_dir: Path, rpc_url: str, name: str) -> int:
    """Refunds NAME's expired books and single bounties, and says what stays escrowed and until when."""
    if name not in datadir.known_users(data_dir):
        raise datadir.DataError(f"there is no user {name!r} here ({datadir.keys_dir(data_dir)} has no keys for it); "
                                "`python3 main.py info` lists the users")
    from web3.exceptions import Web3Exception

    from dm.chain import devchain, ethereum

    w3 = ethereum.connect(rpc_url)
    record = devchain.load_deployment(data_dir)
    if record is None or not ethereum.is_connected(w3):
        print(f"error: no chain with a BountyToken deployment at {rpc_url}: {where.chain_hint(rpc_url)}",
              file=sys.stderr)
        return 1
    token = ethereum.BountyToken(w3, record.address)
    signer = ethereum.Signer(w3, datadir.read_eth_key(datadir.eth_key_path(data_dir, name)))
    try:  # the client pays from the same account: two processes would reuse each other's nonces
        lock = datadir.hold_client_lock(data_dir, name)
    except datadir.Locked as locked:
        pid = f" (pid {locked.pid})" if locked.pid else ""
        raise datadir.DataError(f"{name}'s client.py is running from {data_dir}{pid}: quit it (exit) first, then "
                                "refund") from None
    with lock:
        try:
            return refund_all(token, signer, datadir.client_dir(data_dir, name))
        except (ethereum.ChainError, OSError, Web3Exception) as exc:  # e.g. "nonce too low" from a clash
            raise ethereum.ChainError(f"a refund failed: {exc}; what was refunded stays refunded: run `python3 "
                                      f"main.py refund {name}` again") from None


def refund_all(token, signer, client_dir: Path) -> int:
    """Refunds what `signer` escrowed through the client whose folder is `client_dir`: its
    expired books, then its expired single bounties; says what stays escrowed and until when."""
    from dm.client.payment import BOUNTIES_FILE

    now = token.w3.eth.get_block("latest")["timestamp"]
    refunded, escrowed, waiting = 0, 0, []
    for path in sorted((client_dir / "books").glob("*.json")):
        root = bytes.fromhex(datadir.read_json(path, {})["root"].removeprefix("0x"))
        book = token.book(signer.address, root)
        unspent = book.size - book.spent
        if book.refunded or unspent == 0:
            continue
        if book.expiry >= now:
            escrowed += unspent
            waiting.append(book.expiry)
            print(f"book {root.hex()[:12]}: {unspent} of {book.size} BTK escrowed until {when(book.expiry)} "
                  f"(refundable after that)")
            continue
        token.refund_book(signer, signer.address, root)
        refunded += unspent
        print(f"book {root.hex()[:12]}: {unspent} BTK back")
    single_refunded, single_escrowed, single_waiting = refund_single_bounties(
        token, signer, client_dir / BOUNTIES_FILE, now)
    refunded += single_refunded
    escrowed += single_escrowed
    waiting += single_waiting
    print(f"refunded {refunded} BTK" + (f"; {escrowed} BTK still escrowed in {len(waiting)} book(s) and bounties, "
                                        f"the first refundable after {when(min(waiting))}" if waiting else ""))
    return 0


def refund_single_bounties(token, signer, record: Path, now: int) -> tuple[int, int, list[int]]:
    """Refunds the expired single bounties in `record` (clients/NAME/bounties.jsonl, written by
    dm.client.payment.SinglePayer) that no delivery earned, and drops from the file those no
    longer open; the lines a running client appends meanwhile stay. Returns (BTK refunded, BTK
    still escrowed, the expiries of those)."""
    with datadir.locked(record):
        try:
            lines = record.read_text().splitlines()
        except FileNotFoundError:
            return 0, 0, []
    refunded, closed, waiting = 0, set(), []
    for line in lines:
        try:
            entry = json.loads(line)
            code_hash, _ = bytes.fromhex(entry["code_hash"]), int(entry["expiry"])  # both, or the line is torn
        except (ValueError, KeyError, TypeError):  # a line torn by a crash
            closed.add(line)
            continue
        bounty = token.bounty(signer.address, code_hash)
        if bounty.state != "open":  # redeemed (earned), refunded, or never registered
            closed.add(line)
            continue
        if bounty.expiry >= now:
            waiting.append(bounty.expiry)
            continue
        token.refund(signer, signer.address, code_hash)
        closed.add(line)
        refunded += 1
        print(f"bounty {code_hash.hex()[:12]}: 1 BTK back")
    with datadir.locked(record):  # read again: a client may have registered more since
        datadir.write_lines(record, [line for line in record.read_text().splitlines() if line not in closed])
    return refunded, len(waiting), waiting


def when(timestamp: int) -> str:
    """A chain timestamp as local date and time, as the user reads it."""
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "Y" in argv:  # the original's form: main.py Y user_1 user_2 (options may come first)
        at = argv.index("Y")
        if all(arg.startswith("-") or argv[i - 1] in ("--data-dir", "--rpc-url") for i, arg in enumerate(argv[:at])):
            argv = [*argv[:at], "keys", *argv[at + 1:]]
    # --data-dir and --rpc-url go before or after the command (as with node.py and client.py); SUPPRESS
    # keeps a command's parser from resetting what was given before it (the parsers share these actions,
    # so their default stays SUPPRESS: the None is set after parsing).
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--data-dir", default=argparse.SUPPRESS,
                         help=f"data directory (default: ${datadir.ENV_VAR} or {datadir.DEFAULT})")
    options.add_argument("--rpc-url", default=argparse.SUPPRESS,
                         help="the chain (default: $DM_RPC_URL; for info and refund, then the chain in the data "
                              f"directory's deployment.json; then {DEFAULT_RPC_URL})")
    parser = argparse.ArgumentParser(description="DistributedMessaging: keys, accounts, chain and demo.",
                                     parents=[options])
    commands = parser.add_subparsers(dest="command", required=True)
    keys = commands.add_parser("keys", parents=[options], help="create keys and accounts (also: main.py Y NAME...)")
    keys.add_argument("names", nargs="+")
    info = commands.add_parser("info", parents=[options], help="deployment, users, balances")
    info.add_argument("--json", action="store_true")
    commands.add_parser("chain", parents=[options], help="run the local chain until Ctrl-C")
    refund = commands.add_parser("refund", parents=[options], help="refund a user's expired books and single bounties")
    refund.add_argument("name")
    demo = commands.add_parser("demo", parents=[options], help="a node and two scripted clients")
    demo.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    args.data_dir, args.rpc_url = getattr(args, "data_dir", None), getattr(args, "rpc_url", None)
    from dm import crypto  # light; web3 is loaded only by the commands that need the chain

    try:
        data_dir = datadir.resolve(args.data_dir)
        # info and refund look at the chain the node here pays on; chain and demo start one where told.
        rpc_url, rpc_source = where.chain_url(args.rpc_url, data_dir if args.command in ("info", "refund") else None)
        if args.command == "keys":
            from dm.cli.accounts import create_users

            return create_users(data_dir, args.names)
        if args.command == "info":
            result = gather_info(data_dir, rpc_url, rpc_source)
            print(json.dumps(result, indent=1)) if args.json else print_info(result)
            return 0
        if args.command == "chain":
            return run_chain(data_dir, rpc_url)
        if args.command == "refund":
            return refund_books(data_dir, rpc_url, datadir.check_name(args.name))
        if args.command == "demo":
            from dm.cli import demo

            return demo.run(data_dir, rpc_url, args.port)
    except (datadir.DataError, crypto.KeyFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from dm.chain.ethereum import ChainError  # already loaded when it raised one

        if not isinstance(exc, ChainError):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
