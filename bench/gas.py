#!/usr/bin/env python3
"""Gas per delivered message: the original one-slot contract against ours.

    .venv/bin/python bench/gas.py            # run from the repo root
    .venv/bin/python bench/gas.py --rebuild  # recompile bench/original first

Starts its own anvil on a free loopback port with a throwaway data directory,
deploys the original proof-of-concept contract (bench/original/BountyToken.sol,
compiled to bench/original/artifact.json) and ours (artifacts/BountyToken.json),
sends real transactions, and reads receipt["gasUsed"]. Prints a markdown table
(pasteable into a README) and writes the raw numbers to bench/results/gas.json.

Steady state: every account has held tokens before the measured transactions
(a warm-up message is sent first), so one-time costs such as a relayer's first
balance slot are not counted; the original's first-message cost is reported
separately. For ours the escrow also holds another sender's open bounty, as it
does on any chain with more than one user; the original's single global slot
empties its escrow after every redemption, so its steady state has no such
thing (its numbers include that 0 -> 1 balance write on every registration).
"""
from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import solcx
from web3 import Web3

from benchlib import ROOT
from dm.chain import books as bounty_book
from dm.chain import build as contract_build
from dm.chain import devchain
from dm.chain import faucet as dev_faucet
from dm.chain import ethereum as wu
from harness.chain import DevChain

BENCH = Path(__file__).resolve().parent
ORIGINAL_SOURCE = BENCH / "original" / "BountyToken.sol"
ORIGINAL_ARTIFACT = BENCH / "original" / "artifact.json"
ORIGINAL_ORIGIN = "https://github.com/armalko/DistributedMessaging (contract.sol @ 39ecadc3afb2879cfa365ba6475aff019dccc3f5)"
RESULTS = BENCH / "results" / "gas.json"
# Ours minus viaIR: the original was measured with the legacy pipeline, optimizer on, 200 runs.
ORIGINAL_SETTINGS = {**contract_build.SETTINGS, "viaIR": False}

BATCH_SIZES = (10, 50, 100)
BOOK_SIZES = (10, 50, 100)
PARTIAL_BOOK, PARTIAL_CHUNK = 100, 10
REPEATS = 3  # steady-state single messages per contract (they must agree)
TARGET_BOOK_SIZE, TARGET_GAS = 100, 5_000  # issue 10: at most 5,000 with (sender, root) keys
EXPIRY_SECONDS = 7 * 24 * 3600


# --------------------------------------------------------------------------------------
# Compiling the original (the same route as contract_build.py: py-solc-x, solc-js shim)
# --------------------------------------------------------------------------------------

def original_sources() -> dict[str, str]:
    return contract_build.collect_sources(ORIGINAL_SOURCE)


def compile_original() -> dict:
    compiler = contract_build.find_compiler()
    sources = original_sources()
    output = solcx.compile_standard(
        {"language": "Solidity",
         "sources": {unit: {"content": text} for unit, text in sources.items()},
         "settings": ORIGINAL_SETTINGS},
        solc_binary=compiler,
    )
    contract = output["contracts"][ORIGINAL_SOURCE.name]["BountyToken"]
    return {
        "contractName": "BountyToken",
        "origin": ORIGINAL_ORIGIN,
        "abi": contract["abi"],
        "bytecode": "0x" + contract["evm"]["bytecode"]["object"],
        "deployedBytecode": "0x" + contract["evm"]["deployedBytecode"]["object"],
        "compiler": {"version": solcx.wrapper.get_version_str_from_solc_binary(compiler),
                     "settings": ORIGINAL_SETTINGS},
        "sourceHash": contract_build.source_hash(sources),
    }


def original_artifact(rebuild: bool) -> dict:
    """The committed artifact, recompiled when asked or when source or settings changed."""
    if not rebuild and ORIGINAL_ARTIFACT.exists():
        artifact = wu.load_artifact(ORIGINAL_ARTIFACT)
        if (artifact.get("sourceHash") == contract_build.source_hash(original_sources())
                and artifact.get("compiler", {}).get("settings") == ORIGINAL_SETTINGS):
            return artifact
    print("compiling bench/original/BountyToken.sol ...", file=sys.stderr)
    artifact = compile_original()
    ORIGINAL_ARTIFACT.write_text(json.dumps(artifact, indent=1) + "\n")
    return artifact


def ours_artifact_status() -> str:
    """Whether artifacts/BountyToken.json matches contract.sol (we only read it)."""
    try:
        current = contract_build.source_hash(contract_build.collect_sources())
        return "up to date" if wu.load_artifact().get("sourceHash") == current else "STALE"
    except Exception as exc:  # a missing import etc.: report, do not fail the bench
        return f"unknown ({exc})"


# --------------------------------------------------------------------------------------
# Chain helpers
# --------------------------------------------------------------------------------------

def rpc(w3: Web3, method: str, params: list):
    response = w3.provider.make_request(method, params)
    if "error" in response:
        raise wu.ChainError(f"{method}: {response['error']}")
    return response.get("result")


def now(w3: Web3) -> int:
    return w3.eth.get_block("latest")["timestamp"]


def new_signer(w3: Web3) -> wu.Signer:
    signer = wu.Signer(w3, wu.new_account()[1])
    dev_faucet.give_eth(w3, signer.address, 1_000 * 10**18)
    return signer


def floor_gas(w3: Web3, receipt) -> int:
    """EIP-7623's calldata floor for this transaction (Prague and later)."""
    data = bytes(w3.eth.get_transaction(receipt["transactionHash"])["input"])
    zeros = data.count(0)
    return 21_000 + 10 * (zeros + 4 * (len(data) - zeros))


class Log:
    """Every measured transaction, for gas.json."""

    def __init__(self, w3: Web3):
        self.w3 = w3
        self.txs: list[dict] = []

    def __call__(self, label: str, receipt) -> int:
        gas = receipt["gasUsed"]
        self.txs.append({"label": label, "gasUsed": gas, "calldataFloor": floor_gas(self.w3, receipt),
                         "block": receipt["blockNumber"]})
        return gas


def same(values: list[int], what: str) -> int:
    """The median of repeats that should cost the same. Random codes make a
    few gas of noise (a zero calldata byte costs 4 gas, a non-zero one 16);
    anything larger means the state was not steady, and is reported."""
    if max(values) - min(values) > 100:
        print(f"note: {what} varied between repeats: {sorted(set(values))}", file=sys.stderr)
    return int(statistics.median(values))


# --------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------

def bench_original(token: wu.BountyToken, faucet: wu.Signer, log: Log) -> dict:
    w3 = token.w3
    sender, relayer = new_signer(w3), new_signer(w3)
    token.transfer(faucet, sender.address, 1_000 * 10**18)  # the sender already holds BTK

    def message(tag: str) -> tuple[int, int]:
        # A fresh 32-character code string (128 random bits). Redeem gas grows
        # ~10 gas per character: a 6-character code costs 35,302, 252 less.
        solution = secrets.token_hex(16)
        bounty_hash = Web3.keccak(text=solution)
        reg = log(f"original {tag} registerBounty",
                  token.transact(sender, token.contract.functions.registerBounty(bounty_hash)))
        red = log(f"original {tag} redeemBounty",
                  token.transact(relayer, token.contract.functions.redeemBounty(solution)))
        return reg, red

    first = message("first")  # fresh contract: its bounty slot and the relayer's balance are new
    message("warm-up")
    steady = [message("steady") for _ in range(REPEATS)]
    register = same([r for r, _ in steady], "original register")
    redeem = same([r for _, r in steady], "original redeem")
    return {"first_message": {"register": first[0], "redeem": first[1], "total": sum(first)},
            "register": register, "redeem": redeem, "total": register + redeem}


def bench_ours(token: wu.BountyToken, faucet: wu.Signer, log: Log) -> dict:
    w3 = token.w3
    sender, relayer, other = new_signer(w3), new_signer(w3), new_signer(w3)
    for who in (sender, other):
        token.transfer(faucet, who.address, 100_000 * wu.TOKEN)

    def expiry() -> int:
        return now(w3) + EXPIRY_SECONDS

    def register(tag: str, relayer_address: str | None = None, until: int | None = None) -> tuple[bytes, int]:
        code = secrets.token_bytes(32)
        receipt = token.register(sender, wu.code_hash(code), relayer_address or relayer.address, until or expiry())
        return code, log(f"ours {tag} registerBounty", receipt)

    def message(tag: str) -> tuple[int, int]:
        code, reg = register(tag)
        return reg, log(f"ours {tag} redeemBounty", token.redeem(relayer, sender.address, code))

    out: dict = {}
    message("warm-up")  # the relayer's balance slot becomes non-zero
    empty = [message("empty-escrow") for _ in range(2)]
    out["single_empty_escrow"] = {"register": same([r for r, _ in empty], "ours register (empty escrow)"),
                                  "redeem": same([r for _, r in empty], "ours redeem (empty escrow)")}
    out["single_empty_escrow"]["total"] = sum(out["single_empty_escrow"].values())

    # Another sender's open bounty stays in escrow for the rest of the run.
    token.register(other, wu.code_hash(secrets.token_bytes(32)), relayer.address, expiry())

    steady = [message("steady") for _ in range(REPEATS)]
    reg, red = same([r for r, _ in steady], "ours register"), same([r for _, r in steady], "ours redeem")
    out["single"] = {"register": reg, "redeem": red, "total": reg + red}

    out["batch"] = {}
    for n in BATCH_SIZES:
        registered = [register(f"batch{n}") for _ in range(n)]
        receipt = token.redeem_batch(relayer, [sender.address] * n, [code for code, _ in registered])
        paid = len(token.events(receipt, "BountyRedeemed"))
        assert paid == n, f"redeemBatch paid {paid} of {n}"
        batch_gas = log(f"ours redeemBatch({n})", receipt)
        reg_sum = sum(g for _, g in registered)
        out["batch"][n] = {"register_each": same([g for _, g in registered], f"register in batch {n}"),
                           "register_sum": reg_sum, "redeem_batch": batch_gas,
                           "per_message": (reg_sum + batch_gas) / n}

    def book(n: int, chunk: int, tag: str) -> dict:
        secrets_ = bounty_book.BookSecrets.generate(n)
        opened = log(f"ours {tag} openBook({n})",
                     token.open_book(sender, secrets_.root, n, relayer.address, expiry()))
        redeems = []
        for start in range(0, n, chunk):
            claims = {i: secrets_.codes[i] for i in range(start, min(n, start + chunk))}
            indices, codes, proof, flags = bounty_book.redemption_args(secrets_.tree, claims)
            receipt = token.redeem_book(relayer, sender.address, secrets_.root, indices, codes, proof, flags)
            (event,) = token.events(receipt, "BookRedeemed")
            assert event["paid"] == len(claims), f"redeemBook paid {event['paid']} of {len(claims)}"
            redeems.append(log(f"ours {tag} redeemBook({len(claims)} of {n}, proof {len(proof)})", receipt))
        return {"open": opened, "redeems": redeems, "redeem_sum": sum(redeems),
                "per_message": (opened + sum(redeems)) / n}

    out["book"] = {n: book(n, n, f"book{n}") for n in BOOK_SIZES}
    out["book_partial"] = book(PARTIAL_BOOK, PARTIAL_CHUNK, f"book{PARTIAL_BOOK}x{PARTIAL_CHUNK}")

    # refund: register with a short expiry, let the chain clock pass it, refund.
    refunds = []
    for _ in range(REPEATS):
        code, _ = register("refund-setup", until=now(w3) + 60)
        rpc(w3, "evm_increaseTime", [120])
        rpc(w3, "evm_mine", [])
        refunds.append(log("ours refund", token.refund(sender, sender.address, wu.code_hash(code))))
    out["refund"] = same(refunds, "ours refund")
    return out


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

def ratio(base: float, value: float) -> str:
    if value <= base:
        return f"{base / value:.1f}x cheaper" if base / value >= 1.05 else "same"
    return f"{value / base:.2f}x dearer"


def report(orig: dict, ours: dict, meta: dict) -> tuple[str, bool]:
    base = orig["total"]
    rows = [("Original (one global slot): registerBounty + redeemBounty", "2",
             orig["register"], orig["redeem"], orig["total"])]
    s = ours["single"]
    rows.append(("Ours, single: registerBounty + redeemBounty", "2", s["register"], s["redeem"], s["total"]))
    e = ours["single_empty_escrow"]
    rows.append(("Ours, single, escrow otherwise empty", "2", e["register"], e["redeem"], e["total"]))
    for n, b in ours["batch"].items():
        rows.append((f"Ours, {n} x registerBounty + 1 redeemBatch({n})", f"{n}+1",
                     b["register_each"], b["redeem_batch"] / n, b["per_message"]))
    for n, b in ours["book"].items():
        rows.append((f"Ours, book of {n}: openBook + 1 redeemBook (all {n} leaves)", "1+1",
                     b["open"] / n, b["redeem_sum"] / n, b["per_message"]))
    p = ours["book_partial"]
    rows.append((f"Ours, book of {PARTIAL_BOOK}: openBook + {len(p['redeems'])} redeemBook of {PARTIAL_CHUNK}",
                 f"1+{len(p['redeems'])}", p["open"] / PARTIAL_BOOK, p["redeem_sum"] / PARTIAL_BOOK,
                 p["per_message"]))

    lines = [
        f"Gas per delivered message (anvil {meta['anvil']}, hardfork {meta['hardfork']} (anvil default), "
        f"solc {meta['solc']}, optimizer on, 200 runs; ours viaIR, original legacy pipeline). "
        f"Steady state; amortized per message.",
        "",
        f"| Scenario | Txs | Setup gas / msg | Redeem gas / msg | Total gas / msg | vs original ({base:,}) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, txs, setup, redeem, total in rows:
        cmp_ = "baseline" if name.startswith("Original") else ratio(base, total)
        lines.append(f"| {name} | {txs} | {round(setup):,} | {round(redeem):,} | {round(total):,} | {cmp_} |")

    lines += ["", "Other transactions:", "",
              "| Transaction | gasUsed |", "|---|---:|",
              f"| Original, first message ever: registerBounty | {orig['first_message']['register']:,} |",
              f"| Original, first message ever: redeemBounty | {orig['first_message']['redeem']:,} |",
              f"| Original, first message ever: total | {orig['first_message']['total']:,} |",
              f"| Ours, refund (expired single bounty) | {ours['refund']:,} |"]
    for n, b in ours["batch"].items():
        lines.append(f"| Ours, redeemBatch({n}) | {b['redeem_batch']:,} |")
    for n, b in ours["book"].items():
        lines.append(f"| Ours, openBook({n}) | {b['open']:,} |")
        lines.append(f"| Ours, redeemBook({n} leaves, full multiproof) | {b['redeems'][0]:,} |")
    r = p["redeems"]
    lines.append(f"| Ours, redeemBook(10 of {PARTIAL_BOOK}), first / min / max of {len(r)} | "
                 f"{r[0]:,} / {min(r):,} / {max(r):,} |")

    got = ours["book"][TARGET_BOOK_SIZE]["per_message"]
    met = got <= TARGET_GAS
    lines += ["", f"Target: book of {TARGET_BOOK_SIZE} <= {TARGET_GAS:,} gas per delivered message: "
                  f"{'MET' if met else 'NOT MET'} ({round(got):,} gas)."]
    if meta["floor_bound"]:
        lines.append("Calldata floor (EIP-7623) set the gas of: " + ", ".join(meta["floor_bound"]) + ".")
    return "\n".join(lines), met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild", action="store_true", help="recompile bench/original/BountyToken.sol")
    args = parser.parse_args(argv)
    started = time.monotonic()

    original = original_artifact(args.rebuild)
    ours_status = ours_artifact_status()
    if ours_status != "up to date":
        print(f"warning: artifacts/BountyToken.json is {ours_status} relative to contract.sol; "
              f"run `python3 -m dm.chain.build` for current numbers", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="dm-gas-bench-") as tmp, DevChain(Path(tmp)) as chain:
        w3, faucet = chain.w3, chain.faucet
        info = rpc(w3, "anvil_nodeInfo", [])
        log = Log(w3)
        orig_token, _ = wu.BountyToken.deploy(faucet, 1_000_000_000, original)  # the original scales by 1e18

        orig = bench_original(orig_token, faucet, log)
        ours = bench_ours(chain.token, faucet, log)
        anvil_version = w3.client_version.removeprefix("anvil/")

    floor_bound = sorted({t["label"] for t in log.txs if t["gasUsed"] == t["calldataFloor"]})
    meta = {"anvil": anvil_version, "hardfork": str(info.get("hardFork", "?")),
            "solc": original["compiler"]["version"], "floor_bound": floor_bound,
            "ours_artifact": ours_status, "original_source": ORIGINAL_ORIGIN,
            "original_settings": ORIGINAL_SETTINGS, "ours_settings": wu.load_artifact()["compiler"]["settings"]}
    table, met = report(orig, ours, meta)
    print(table)

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "meta": meta,
        "original": orig,
        "ours": ours,
        "target": {"book_size": TARGET_BOOK_SIZE, "max_gas_per_message": TARGET_GAS,
                   "measured": ours["book"][TARGET_BOOK_SIZE]["per_message"], "met": met},
        "transactions": log.txs,
    }, indent=1) + "\n")
    print(f"\nraw numbers: {RESULTS.relative_to(ROOT)}  ({time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
