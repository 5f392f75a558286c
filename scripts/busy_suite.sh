#!/usr/bin/env bash
# The suite on a busy machine, as issue #15 asks it to pass: a CPU hog (`yes`) and a disk writer (256 MiB
# `dd ... conv=fdatasync` in a loop, in the repo's folder, so on the state dirs' disk) run beside it, and
# stop with it. Usage: scripts/busy_suite.sh [pytest args...]; prints the suite's output and its wall time.
set -u
cd "$(dirname "$0")/.."
load=$(mktemp -d ./.busy-load.XXXXXX)
yes > /dev/null &
hog=$!
( while :; do dd if=/dev/zero of="$load/dd" bs=1M count=256 conv=fdatasync status=none; done ) &
writer=$!
trap 'kill "$hog" "$writer" 2>/dev/null; pkill -P "$writer" 2>/dev/null; rm -rf "$load"' EXIT
start=$(date +%s)
.venv/bin/python -m pytest -q "$@"
rc=$?
echo "busy suite: exit $rc, wall $(( $(date +%s) - start )) s"
exit $rc
