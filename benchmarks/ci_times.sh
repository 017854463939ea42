#!/usr/bin/env bash
# .ci/run from a fresh clone of this checkout's HEAD, with the time at which each of its commands starts
# (bash's trace, stamped with seconds since the start) and pytest's 15 slowest tests per suite. Like CI, it
# reinstalls the package (editable) from the clone: reinstall from your checkout afterwards.
#   bash benchmarks/ci_times.sh [WORKDIR]     # WORKDIR: default a new temporary folder; log in WORKDIR/ci.log
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
git clone -q "$repo" "$work/clone"
# bash takes PS4 from a startup file, not from the environment (never for root)
echo "PS4='+ [\$SECONDS s] '" > "$work/trace.sh"
cd "$work/clone"
status=0
CI=true PYTEST_ADDOPTS="--durations=15" BASH_ENV="$work/trace.sh" bash -x .ci/run > "$work/ci.log" 2>&1 || status=$?
grep -E '^\+ \[|^=+ .*(passed|failed|error)' "$work/ci.log"
echo "in all: $SECONDS s, exit $status (log: $work/ci.log)"
exit "$status"
