#!/bin/bash
# Relay throughput of several checkouts side by side, alternated in one sitting (the machine's
# speed drifts between hours, so only alternated figures compare), then the minimal relay.
#
#   bench/relay_ab.sh ROUNDS LABEL=CHECKOUT [LABEL=CHECKOUT ...]
#   e.g. bench/relay_ab.sh 5 before=/tmp/dm-fa453f5 main=.
#
# Each checkout needs its .venv and node_modules (a `git worktree` with both symlinked will do);
# the minimal relay is ../shared/anchors/minimal_relay.py beside this checkout.
set -euo pipefail
rounds=$1; shift
anchor="$(cd "$(dirname "$0")/.." && pwd)/../shared/anchors/minimal_relay.py"
for round in $(seq 1 "$rounds"); do
  for spec in "$@"; do
    label=${spec%%=*}; dir=${spec#*=}
    result=$(cd "$dir" && .venv/bin/python bench/relay.py --only throughput 2>&1 \
             | grep -oE '[0-9,]+ msg/s \([^)]*\)' | head -1)
    (cd "$dir" && git checkout -q -- bench/results 2>/dev/null || true)  # a run rewrites relay.json
    echo "round $round $label: $result"
  done
  echo "round $round minimal relay: $(python3 "$anchor" 2>&1 | tail -1)"
done
