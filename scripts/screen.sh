#!/usr/bin/env bash
# A design on several seeds at once, on the dev split: one `bash iterate.sh` per seed, every process of it at one CPU
# thread (NPROC=1, TRAIN_THREADS=1), so that N loops share N cores; then the runs side by side with the mean gain over
# the seeds ± se (report.py). On a GPU machine the SFTs share the GPU and the searches run on its cores
# (docs/experiments.md, "Sixteen dev loops at once"). The SFT's outcome varies from seed to seed, so a design is
# judged on several before any test split is run.
#
#   NAME=chain SEEDS="0 1 2 3 4 5 6 7" SYNTH_ARGS="--num-questions 240,480,720 --judgment-check chain" \
#     bash scripts/screen.sh
#
# Outputs: $RUNS/$NAME-seedN (RUNS=runs), the data $DATAS/$NAME-seedN (DATAS=data: a design's own, since SYNTH_ARGS
# may change it), each loop's log $RUNS/$NAME-seedN.log. Every other variable of iterate.sh passes through
# (SYNTH_ARGS, MODEL_ARGS, SFT_ARGS, NUM_ITERS, SPLIT, ...). Rerun: each loop resumes where it stopped. Ctrl-C or
# `kill <pid>` stops the screen with its loops; `kill -9` cannot be caught and leaves them running (a rerun stops at
# each loop's lock; `pgrep -af iterate.sh` lists them).
{  # read whole before it runs, as iterate.sh is: an edit to this file reaches the next screen, not this one
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${NAME:?NAME=<a name for the runs>, e.g. NAME=chain}
SEEDS=${SEEDS:-0 1 2 3}
RUNS=${RUNS:-runs}
DATAS=${DATAS:-data}
export SPLIT=${SPLIT:-dev}  # tune on the dev split, never on test
[[ "$SEEDS" =~ ^[[:space:]]*[0-9]+([[:space:]]+[0-9]+)*[[:space:]]*$ ]] || {
  echo "SEEDS=\"$SEEDS\": one or more non-negative integers, e.g. SEEDS=\"0 1 2 3\"" >&2; exit 1; }

mkdir -p "$RUNS"
pids=() runs=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT  # stopping the screen stops its loops
for s in $SEEDS; do
  run=$RUNS/$NAME-seed$s
  echo "+ SEED=$s NPROC=1 TRAIN_THREADS=1 RUN_DIR=$run DATA=$DATAS/$NAME-seed$s bash iterate.sh > $run.log" >&2
  SEED=$s NPROC=1 TRAIN_THREADS=1 RUN_DIR=$run DATA=$DATAS/$NAME-seed$s bash iterate.sh > "$run.log" 2>&1 &
  pids+=($!) runs+=("$run")
done

failed=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { echo "${runs[$i]} failed: its log is ${runs[$i]}.log" >&2; failed=1; }
done
done_runs=()
for run in "${runs[@]}"; do [ -f "$run/summary.json" ] && done_runs+=(--run "$run"); done
[ ${#done_runs[@]} -gt 0 ] && python report.py "${done_runs[@]}"
exit $failed
}
