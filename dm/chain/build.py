"""Compile contract.sol into the committed artifact, through py-solc-x.

A native solc on PATH is used when one is installed; otherwise solc-js from
node_modules through tools/solcjs (py-solc-x cannot download compilers here).
Imports are resolved here and inlined as source contents, so both compilers
see exactly the same input and the source hash covers every imported file.

    python3 -m dm.chain.build           # rewrite artifacts/BountyToken.json
    python3 -m dm.chain.build --check   # exit 1 when the artifact is stale
"""
from __future__ import annotations

import argparse
import hashlib
import json
import posixpath
import re
import shutil
import sys
from pathlib import Path

import solcx

from dm import PROJECT_ROOT
from dm.chain.ethereum import ARTIFACT_PATH as ARTIFACT
from dm.chain.ethereum import ChainError, load_artifact

ROOT = PROJECT_ROOT
SOURCE = ROOT / "contract.sol"
CONTRACT_NAME = "BountyToken"
SOLC_JS_SHIM = ROOT / "tools" / "solcjs"
NODE_MODULES = ROOT / "node_modules"

# cancun: the newest fork both anvil and eth-tester's py-evm run.
SETTINGS = {
    "optimizer": {"enabled": True, "runs": 200},
    "viaIR": True,
    "evmVersion": "cancun",
    "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}},
}

_IMPORT = re.compile(r'^\s*import\s+(?:[^"\';]*?\s+from\s+)?["\']([^"\']+)["\']', re.MULTILINE)


class BuildError(Exception):
    pass


def find_compiler() -> Path:
    native = shutil.which("solc")
    if native:
        return Path(native)
    if not (NODE_MODULES / "solc" / "solc.js").exists():
        raise BuildError("no compiler: install a native solc or run `npm ci` for solc-js")
    return SOLC_JS_SHIM


def collect_sources(entry: Path = SOURCE) -> dict[str, str]:
    """Source unit name -> content for the entry file and everything it imports."""
    sources: dict[str, str] = {}
    pending = [entry.name]
    while pending:
        unit = pending.pop()
        if unit in sources:
            continue
        path = entry if unit == entry.name else NODE_MODULES / unit
        if not path.exists():
            raise BuildError(f"cannot resolve import {unit!r} (looked at {path})")
        content = path.read_text()
        sources[unit] = content
        for target in _IMPORT.findall(content):
            if target.startswith("."):
                target = posixpath.normpath(posixpath.join(posixpath.dirname(unit), target))
            pending.append(target)
    return dict(sorted(sources.items()))


def source_hash(sources: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for unit, content in sources.items():
        digest.update(unit.encode() + b"\0" + content.encode() + b"\0")
    return digest.hexdigest()


def compile_artifact() -> dict:
    compiler = find_compiler()
    sources = collect_sources()
    output = solcx.compile_standard(
        {
            "language": "Solidity",
            "sources": {unit: {"content": text} for unit, text in sources.items()},
            "settings": SETTINGS,
        },
        solc_binary=compiler,
    )
    contract = output["contracts"][SOURCE.name][CONTRACT_NAME]
    version = solcx.wrapper.get_version_str_from_solc_binary(compiler)
    return {
        "contractName": CONTRACT_NAME,
        "abi": contract["abi"],
        "bytecode": "0x" + contract["evm"]["bytecode"]["object"],
        "deployedBytecode": "0x" + contract["evm"]["deployedBytecode"]["object"],
        "compiler": {"version": version, "settings": SETTINGS},
        "sourceHash": source_hash(sources),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed artifact is stale")
    args = parser.parse_args(argv)
    try:
        fresh = compile_artifact()
        if args.check:
            current = load_artifact()
            stale = [k for k in ("sourceHash", "bytecode", "abi") if current.get(k) != fresh[k]]
            if stale:
                print(f"artifact is stale ({', '.join(stale)} differ): run `python3 -m dm.chain.build`")
                return 1
            print("artifact is up to date")
            return 0
        ARTIFACT.parent.mkdir(exist_ok=True)
        ARTIFACT.write_text(json.dumps(fresh, indent=1) + "\n")
        print(f"wrote {ARTIFACT.relative_to(ROOT)} with {fresh['compiler']['version']}")
        return 0
    except (BuildError, ChainError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except solcx.exceptions.SolcError as exc:
        # The exception's text carries the whole compiler output; show the errors only.
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
