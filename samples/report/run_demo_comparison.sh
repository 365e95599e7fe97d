#!/usr/bin/env bash
# The comparison in samples/report/: the CPU demo (configs/demo_digits.yaml) with attention
# none / self / external, 3 training seeds each, shortened to 200 steps (the demo's 1,400 did not
# fit the time this machine had) with an evaluation every 100 steps on 32 samples; then the
# report. The three kinds train side by side, one thread each; running the script again
# continues whatever is unfinished.
#   WEIGHTS=path/to/inception.pth samples/report/run_demo_comparison.sh
# Offline, WEIGHTS are stand-in weights (tests/inception_standin.py): FID and IS then only show
# the tool at work; the class accuracy of benchmarks/demo_class_accuracy.py is the measure that
# means something here.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
WEIGHTS=${WEIGHTS:?set WEIGHTS to an Inception weights file}
RUNS=${RUNS:-runs/demo_compare}
export OMP_NUM_THREADS=1
SHORT=(--set train.total_steps=200 --set eval.every=100 --set eval.num_samples=32
       --set eval.batch_size=32 --inception-weights "$WEIGHTS" --no-progress)
# One evaluation first, so that the reference statistics of the 360 test digits are computed
# and cached once rather than by each of the three processes.
if [ ! -d "$RUNS/warmup" ]; then
    "$PYTHON" run.py -c configs/demo_digits.yaml --train --run-dir "$RUNS/warmup" "${SHORT[@]}" \
        --set train.total_steps=1 --set eval.every=1 --set eval.num_samples=2
fi
for kind in none self external; do
    "$PYTHON" run.py -c configs/demo_digits.yaml --train --seeds 0,1,2 \
        --run-dir "$RUNS/$kind" --set model.attention="$kind" "${SHORT[@]}" \
        > "$RUNS/$kind.log" 2>&1 &
done
wait
"$PYTHON" run.py --report "$RUNS"/{none,self,external}/seed* --out samples/report \
    --class-accuracy
