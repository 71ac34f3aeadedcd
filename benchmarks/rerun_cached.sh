#!/bin/bash
# Re-runs on an unchanged scan with a warm cache, before and after: the OpenFlexure
# server's live preview (--stitching_mode only_stage_stitch) and a full stitch, each run
# N times, the two versions interleaved. Prints "MODE VERSION SECONDS s PEAK_RSS KB".
#
# Usage: benchmarks/rerun_cached.sh BEFORE_COMMIT [SCAN_DIR] [N]
#   SCAN_DIR: a folder of tiles (default the 100x820x616 scan compare.py builds:
#   python benchmarks/compare.py --scans 100x820x616 --programs floor)
# Runs in the project's virtual environment (.venv); the scan is copied to a temporary
# folder, and BEFORE_COMMIT is checked out into a temporary git worktree.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BEFORE=${1:?give the commit to compare with}
SCAN=${2:-$ROOT/benchmarks/work/scans/100x820x616/tiles}
N=${3:-5}
WORK=$(mktemp -d)
trap 'git -C "$ROOT" worktree remove --force "$WORK/before" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
git -C "$ROOT" worktree add --detach "$WORK/before" "$BEFORE" >/dev/null
cp -r "$SCAN" "$WORK/scan"
. "$ROOT/.venv/bin/activate"
cd "$WORK"  # not the checkout: its ofstitch/ would shadow the one on PYTHONPATH

run() {  # run VERSION MODE [time]
    if [ "$1" = before ]; then export PYTHONPATH="$WORK/before"; else unset PYTHONPATH; fi
    if [ "${3:-}" = time ]; then
        /usr/bin/time -f "$2 $1 %e s %M KB" python -m ofstitch --stitching_mode "$2" \
            "$WORK/scan" 2>&1 >/dev/null | tail -1
    else
        python -m ofstitch --stitching_mode "$2" "$WORK/scan" >/dev/null 2>&1
    fi
}

for mode in only_stage_stitch all; do
    run before "$mode"; run now "$mode"  # each version's own cache entries, warm
    for _ in $(seq "$N"); do
        run before "$mode" time
        run now "$mode" time
    done
done
