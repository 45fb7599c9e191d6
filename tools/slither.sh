#!/usr/bin/env bash
# Slither on contract.sol, compiled by our solc-js (tools/solcjs: nothing is
# downloaded), then the findings counted by impact. Slither lives in its own
# virtualenv, made here from pinned versions when missing; it is not one of
# the project's requirements.
#
#   tools/slither.sh                      # report on stderr, counts on stdout
#   SLITHER_VENV=/some/dir tools/slither.sh
#
# Exits 1 when contract.sol has a High or Medium finding, 2 when Slither fails.
set -euo pipefail

SLITHER_VERSION=0.11.6
CRYTIC_COMPILE_VERSION=0.4.2
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SLITHER_VENV:-/tmp/slither-venv}

if [ "$("$VENV/bin/slither" --version 2>/dev/null)" != "$SLITHER_VERSION" ]; then
    echo "installing slither-analyzer $SLITHER_VERSION into $VENV ..." >&2
    "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "slither-analyzer==$SLITHER_VERSION" "crytic-compile==$CRYTIC_COMPILE_VERSION"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$ROOT"

# A standard-JSON input naming contract.sol by URL, with dm/chain/build.py's
# settings: the shim resolves the file and its OpenZeppelin imports from the
# repository and node_modules, and Slither maps findings back to those files.
"$VENV/bin/python" - "$work/input.json" <<'EOF'
import ast, json, sys
tree = ast.parse(open("dm/chain/build.py").read())
settings = next(ast.literal_eval(node.value) for node in tree.body
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "SETTINGS")
settings["outputSelection"] = {"*": {"*": ["abi", "evm.bytecode", "evm.deployedBytecode"], "": ["ast"]}}
with open(sys.argv[1], "w") as out:
    json.dump({"language": "Solidity", "sources": {"contract.sol": {"urls": ["contract.sol"]}},
               "settings": settings}, out)
EOF

if ! "$VENV/bin/slither" "$work/input.json" --compile-force-framework solc-json \
        --solc "$ROOT/tools/solcjs" --fail-none --json "$work/results.json"; then
    echo "slither failed (see above)" >&2
    exit 2
fi

"$VENV/bin/python" - "$work/results.json" "$SLITHER_VERSION" <<'EOF'
import collections, json, sys
data = json.load(open(sys.argv[1]))
if not data.get("success"):
    print(f"slither failed: {data.get('error')}", file=sys.stderr)
    sys.exit(2)
results = data.get("results", {}).get("detectors", [])
IMPACTS = ("High", "Medium", "Low", "Informational", "Optimization")


def ours(result):
    elements = result.get("elements") or [{}]
    return elements[0].get("source_mapping", {}).get("filename_relative") == "contract.sol"


def counts(rs):
    c = collections.Counter(r["impact"] for r in rs)
    return ", ".join(f"{impact} {c[impact]}" for impact in IMPACTS)


mine = [r for r in results if ours(r)]
print(f"slither {sys.argv[2]} on contract.sol: {counts(mine)}")
for (impact, check), n in sorted(collections.Counter((r["impact"], r["check"]) for r in mine).items(),
                                 key=lambda item: (IMPACTS.index(item[0][0]), item[0][1])):
    print(f"  {impact:<13} {check}: {n}")
print(f"in the OpenZeppelin files it imports: {counts([r for r in results if not ours(r)])}")
sys.exit(1 if any(r["impact"] in ("High", "Medium") for r in mine) else 0)
EOF
