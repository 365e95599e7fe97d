#!/usr/bin/env bash
# The comparison in samples/report/: the CPU demo (configs/demo_digits.yaml as committed) with
# attention none, self, external and efficient, training seeds 0 to 4 each, at the full 3,000
# steps, scored by the digits protocol every 500 steps; then the report.
#
#   samples/report/run_demo_comparison.sh 0 &   # worker 0 of 2, one thread
#   samples/report/run_demo_comparison.sh 1 &   # worker 1 of 2, one thread
#   wait; samples/report/run_demo_comparison.sh report
#
# The 20 (seed, kind) runs are dealt to the two workers seed by seed, each kind to the other
# worker at the next seed, so that every kind gains seeds at the same pace on both. A worker
# stopped at any moment continues where it stopped when started again: each run is
# `--train --seeds S`, which skips a finished seed and resumes an unfinished one from its latest
# checkpoint. Each run's start and end times go to
# $RUNS/worker<W>.log.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
RUNS=${RUNS:-runs/demo_compare}
KINDS=(external self none efficient)
SEEDS=(0 1 2 3 4)
export OMP_NUM_THREADS=1

if [ "${1:?worker 0 or 1, or report}" = report ]; then
    "$PYTHON" run.py --report "$RUNS"/{none,self,external,efficient}/seed* --out samples/report
    exit
fi
mkdir -p "$RUNS"
for seed in "${SEEDS[@]}"; do
    for k in "${!KINDS[@]}"; do
        kind=${KINDS[$k]}
        if [ $(((seed + k) % 2)) -eq "$1" ]; then
            echo "start $kind seed $seed $(date -u +%FT%TZ)" >> "$RUNS/worker$1.log"
            "$PYTHON" run.py -c configs/demo_digits.yaml --train --seeds "$seed" \
                --run-dir "$RUNS/$kind" --set model.attention="$kind" --no-progress \
                >> "$RUNS/$kind-seed$seed.log" 2>&1
            echo "end $kind seed $seed $(date -u +%FT%TZ)" >> "$RUNS/worker$1.log"
        fi
    done
done
