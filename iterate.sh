#!/usr/bin/env bash
# Process-based Self-Rewarding, end to end (paper §3): M0 -> M1 (SFT on IFT + EFT) -> for t in 1..3:
#   step-by-step search with self-judging on fresh questions -> step preference pairs -> Step-DPO -> evaluate.
# Every stage is one printed command; a finished stage is skipped on rerun if its manifest (inputs by content,
# flags) matches, a changed one stops the run saying what changed: OVERWRITE=1 redoes every stage (or delete a
# stage's output to redo it). Outputs: runs/$RUN/iter0 (M1), runs/$RUN/iter$t (M_{t+1}), summary. One run at a
# time per run directory (a lock); when one shard of a stage fails, its sibling shards are stopped too; Ctrl-C or a
# kill of this script stops the running stage with it.
#
#   bash iterate.sh                              # the embedded default: tiny model, synthetic task, CPU, ~23 min
#   RUN=random JUDGE=random INIT=runs/default/iter0/model bash iterate.sh   # control: coin-flip judge, same M1
#   RUN=oracle JUDGE=oracle INIT=runs/default/iter0/model bash iterate.sh   # control: a perfect judge, same M1
#   SEED=1 bash iterate.sh                       # a replicate: new data, init, order, sampling (runs/default-seed1)
#   RUN=srlm METHOD=srlm INIT=runs/psrlm/iter0/model bash iterate.sh        # the outcome-based SRLM baseline
#     from an M1 that learned both judges (RUN=psrlm SRLM_EFT=5000 bash iterate.sh; docs/comparisons.md)
#   SPLIT=dev RUN=try1 DPO_ARGS="..." INIT=... bash iterate.sh              # tune on the dev split, never on test
#   NAME=try SEEDS="0 1 2 3" SYNTH_ARGS="..." bash scripts/screen.sh       # a design on four dev seeds at once
#   PRESET=smollm2 SHARED=/path/to/copies bash iterate.sh  # the paper's path on a real pretrained model, CPU, toy
#   PRESET=paper MODEL=Qwen/Qwen2.5-Math-7B RUN=qwen7b bash iterate.sh      # paper setup on GPUs (see README)
#   PATH=.venv-vllm/bin:$PATH ENGINE=vllm RUN=vllm bash iterate.sh         # search + evaluation through vLLM
{  # bash reads a script as it runs it: in braces it reads all of it first, so an edit to this file reaches
   # the next run, not the loop running now (the closing brace, and the exit before it, are the file's last lines)
set -euo pipefail
cd "$(dirname "$0")"

SEED=${SEED:-}                 # a replicate: the seed of M0's init, the SFT and DPO order and the search sampling,
                               # and (tiny preset) of the data, data/synthetic-seed$SEED; empty: the default run (=0)
DATA_SEED=${DATA_SEED-$SEED}   # the data's seed, if not SEED; DATA_SEED= (set, empty): the default data set
for v in "$SEED" "$DATA_SEED"; do
  [[ "$v" =~ ^[0-9]*$ ]] || { echo "SEED=$SEED DATA_SEED=$DATA_SEED: non-negative integers (or empty)" >&2; exit 1; }
done
TRAIN_THREADS=${TRAIN_THREADS:-}  # N: CPU threads of each training process; empty: torch's own (every core); 1, with
                               # NPROC=1: a loop per core (scripts/screen.sh: several seeds at once)
[[ "$TRAIN_THREADS" =~ ^([1-9][0-9]*)?$ ]] || { echo "TRAIN_THREADS=$TRAIN_THREADS: a positive integer" >&2; exit 1; }
RUN=${RUN:-default${SEED:+-seed$SEED}}  # outputs go to runs/$RUN
PRESET=${PRESET:-tiny}         # tiny: the embedded default on CPU | smollm2: SmolLM2-135M, CPU | paper: Qwen2.5-Math
MODEL=${MODEL:-}               # M0; empty with PRESET=tiny: built here (prepare/tiny_model.py)
INIT=${INIT:-}                 # an existing M1 to start from (skips SFT), e.g. to compare judges from one M1
JUDGE=${JUDGE:-model}          # model: the paper's self-judging | controls: random (coin flips), oracle (true labels)
METHOD=${METHOD:-psrlm}        # psrlm: the paper's step search | srlm: the outcome-based baseline (Yuan et al. 2024,
                               # paper Table 1): whole solutions scored 0-5 by the model, best vs worst
SRLM_EFT=${SRLM_EFT:-}         # N: M1 also learns the SRLM judge from N whole-solution scorings (tiny preset;
                               # METHOD=srlm without INIT: 5000); empty: the default M1 (step judge only)
NUM_ITERS=${NUM_ITERS:-}       # default 3, paper: M1 -> M2 -> M3 -> M4 (the smollm2 preset: 1)
OVERWRITE=${OVERWRITE:-}       # 1: redo every stage
ENGINE=${ENGINE:-}             # hf: HF generate | vllm (docs/vllm.md); default hf (PRESET=paper: vllm if installed)
# Each stage's flags below can be overridden from the environment (SFT_ARGS=..., SYNTH_ARGS=..., MODEL_ARGS=...).
# DATA holds questions1..3.jsonl, eft_test.jsonl, ift.jsonl, eft.jsonl (+ srlm_eft.jsonl); NPROC = processes

if [ "$PRESET" = tiny ]; then
  DATA=${DATA:-data/synthetic${DATA_SEED:+-seed$DATA_SEED}}
  ENGINE=${ENGINE:-hf}
  [ "$ENGINE" = vllm ] && NPROC=${NPROC:-1}  # vLLM's CPU worker binds a core of its own: one engine, not two
  NPROC=${NPROC:-2}
  PROMPTS="--prompt-reasoning reasoning_tiny"
  JUDGE_PROMPT="--prompt-judge judge_tiny"
  SRLM_JUDGE_PROMPT="--prompt-srlm-judge srlm_judge_tiny"
  # METHOD=srlm: k=4 solutions (Yuan et al.), 3 scorings each (theirs), as many tokens as the evaluation's solutions;
  # the SRLM EFT judgments (each step read and counted out, as the step judge does) run to 425 tokens
  SRLM_ARGS=${SRLM_ARGS:-"--num-candidates 4 --srlm-scorings 3 --max-new-tokens 160 --judge-max-new-tokens 448 \
--batch-size 128 --questions-per-chunk 64"}
  # 2 epochs (4,000 steps): with 1.5 (and 5k/27k data), two of three seeds' judges read the question on 82 % of
  # held-out pairs (94-95 % with 2); --max-len 1024 keeps the SRLM judge's examples (SRLM_EFT, over 512 tokens) whole
  SFT_ARGS=${SFT_ARGS:-"--epochs 2 --lr 2e-3 --batch-size 16 --max-len 1024"}
  # questions per iteration: the paper's 400/800/1200 scaled by 0.6. The judge copies the question from its start
  # through the judged step, then counts the step out (chain); a fifth of the task's facts are written off by one in
  # the solutions (not in the answers), so every policy has errors its judge catches: on five dev seeds the loop
  # gained +8.4 to +12.6, on the test split +9.4 to +11.8 (docs/experiments.md). Without the noise, the chain's
  # policies learned the task to 90 % or more on six of thirteen draws; SYNTH_ARGS="--num-questions 240,480,720": the
  # rereading judge, the default before 2026-12-05
  SYNTH_ARGS=${SYNTH_ARGS:-"--num-questions 240,480,720 --judgment-check chain --noisy-facts 0.2"}
  # --orders 1: each pair judged once, half the judge's time (the paper does not say it judges both orders); the
  # judgments run to 130 tokens in the default data (prepare/synthetic.py: judgment; the rereading judge's to 143)
  GEN_ARGS=${GEN_ARGS:-"--orders 1 --max-step-tokens 40 --judge-max-new-tokens 192 --batch-size 128 --questions-per-chunk 64"}
  # lr 3e-5, tuned on the dev split with a perfect judge (JUDGE=oracle, so the lr is judged apart from the judge) on the
  # first default: M1 40.2 -> 42.0 -> 45.2 -> 47.4; 1e-5 gave 41.2, 42.2; 1e-4 42.8, then 38.8; on this one, 1e-4
  # without accumulation lost 4.8 points from a weak M1 and 1.6 from a strong one (docs/experiments.md).
  # --steps 16: every iteration takes 16 optimizer steps, its batch growing with its pairs (at most a step per 16
  # pairs: one with fewer than 256 pairs takes fewer; the paper keeps batch 32, so its steps grow with the
  # questions; 48 steps of 3e-5 in one iteration broke a reading of the tiny model's, and 16 steps over twice the
  # questions gained more on dev than batch 32: docs/experiments.md)
  DPO_ARGS=${DPO_ARGS:-"--lr 3e-5 --beta 0.1 --batch-size 16 --steps 16 --epochs 1"}
  EVAL_ARGS=${EVAL_ARGS:-"--max-new-tokens 160 --batch-size 128"}
  JUDGE_EVAL_ARGS=${JUDGE_EVAL_ARGS:-"--judge-max-new-tokens 192 --batch-size 128"}
  SPLIT=${SPLIT:-test}         # dev: the tuning split (dev.jsonl, eft_dev.jsonl)
  EVAL_DATA="--data $DATA/$SPLIT.jsonl"
  JUDGE_EVAL_DATA="$DATA/eft_$SPLIT.jsonl"
  TRAIN="python"               # one process, both cores
  export OMP_NUM_THREADS=1     # search/eval of a 1M-parameter model: one process per core beats two threads
  export TORCH_DTYPE=${TORCH_DTYPE:-float32}  # on a GPU too: the default was tuned in fp32 (modeling.py)
else
  [ -f "presets/$PRESET.sh" ] || { echo "PRESET=$PRESET: no presets/$PRESET.sh (tiny, smollm2 or paper)" >&2; exit 1; }
  source "presets/$PRESET.sh"  # sets the same variables (and MODEL, DATA, DATA_SOURCE, NPROC)
fi
NUM_ITERS=${NUM_ITERS:-3}
SRLM_JUDGE_PROMPT=${SRLM_JUDGE_PROMPT:-"--prompt-srlm-judge srlm_judge"}  # Yuan et al. Fig. 2 (other presets)
SRLM_ARGS=${SRLM_ARGS:-"--num-candidates 4 --srlm-scorings 3"}
case "$METHOD" in psrlm|srlm) ;; *) echo "METHOD=$METHOD: psrlm or srlm" >&2; exit 1 ;; esac
[ "$METHOD" = srlm ] && [ "$JUDGE" != model ] && { echo "METHOD=srlm scores with the model; JUDGE=$JUDGE is a" \
  "control of the step search" >&2; exit 1; }
[ "$METHOD" = srlm ] && [ "$PRESET" = tiny ] && [ -z "$INIT" ] && SRLM_EFT=${SRLM_EFT:-5000}
[ -n "$SEED" ] && SEED_ARG="--seed $SEED" || SEED_ARG=""
[ -n "$SRLM_EFT" ] && SRLM_SFT="--srlm-eft $DATA/srlm_eft.jsonl $SRLM_JUDGE_PROMPT" || SRLM_SFT=""
ENGINE=${ENGINE:-hf}
[ -n "$OVERWRITE" ] && OW="--overwrite" || OW=""
# the searches run one thread per process (OMP_NUM_THREADS=1 above); training takes every core unless told otherwise
[ -n "$TRAIN_THREADS" ] && TRAIN_ENV="OMP_NUM_THREADS=$TRAIN_THREADS" || TRAIN_ENV="-u OMP_NUM_THREADS"
R=${RUN_DIR:-runs/$RUN}
mkdir -p "$R"
exec 9>"$R/.lock"  # held by this script and its stages until the last of them ends
flock -n 9 || { echo "error: another iterate.sh is running on $R (it holds $R/.lock); wait or stop it" >&2; exit 1; }
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # never leave a shard running after the driver stops
trap 'exit 130' INT TERM

run() { echo "+ $*" >&2; "$@" & wait $!; }  # waited on, not in the foreground: a stop signal ends the stage at once

sharded() {  # a stage as NPROC processes over every NPROC-th record; the last to finish merges; one fails: all stop
  local pids=() i
  for i in $(seq 0 $((NPROC - 1))); do
    echo "+ LOCAL_RANK=$i $* --shard $i/$NPROC" >&2
    LOCAL_RANK=$i "$@" --shard "$i/$NPROC" &
    pids+=($!)
  done
  while [ ${#pids[@]} -gt 0 ]; do
    # wakes when a shard ends; its status is read by pid below (bash's `wait -n` misses one that already ended)
    wait -n "${pids[@]}" 2>/dev/null || true
    local left=() pid
    for pid in "${pids[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then left+=("$pid"); continue; fi
      if ! wait "$pid"; then
        echo "a shard of $2 failed: stopping the others" >&2
        kill "${pids[@]}" 2>/dev/null || true
        wait || true
        return 1
      fi
    done
    pids=("${left[@]}")
  done
}

evaluate() {  # $1: model dir -> $1/../eval
  local out; out=$(dirname "$1")/eval
  sharded python evaluate.py --model "$1" $EVAL_DATA --out-dir "$out" $PROMPTS $EVAL_ARGS --engine "$ENGINE" $OW
  sharded python evaluate.py --model "$1" --judge-eval "$JUDGE_EVAL_DATA" --out-dir "$out" $JUDGE_PROMPT \
      $JUDGE_EVAL_ARGS --engine "$ENGINE" $OW
}

# --- data and M0 (the tiny default builds both; the real-data presets build their data and load MODEL) -------------
if [ "$PRESET" = tiny ]; then
  run python -m prepare.synthetic --out-dir "$DATA" $SYNTH_ARGS \
      ${SRLM_EFT:+--srlm-eft $SRLM_EFT} ${DATA_SEED:+--seed $((1234 + DATA_SEED))} $OW  # 1234: its default
  # M0 is built only for an SFT: a run from INIT starts at M1
  [ -z "$MODEL" ] && [ -z "$INIT" ] && MODEL=$R/m0 && run python -m prepare.tiny_model \
      --corpus "$DATA/ift.jsonl" "$DATA/eft.jsonl" --out "$MODEL" ${MODEL_ARGS:-} $SEED_ARG $OW
else
  run python -m prepare.paper_data --source "$DATA_SOURCE" --out-dir "$DATA" ${DATA_ARGS:-} $OW
  if [ "$PRESET" = smollm2 ]; then run python -m prepare.smollm2 --out "$MODEL"; fi  # converted once, then cached
fi

# --- M1: SFT on IFT + EFT (paper §3.2) ---------------------------------------------------------------------------
M1=$R/iter0/model
if [ -n "$INIT" ]; then  # M1 is a link to INIT; another INIT than the run's stops it, or is relinked under OVERWRITE
  mkdir -p "$R/iter0"
  if [ -e "$M1" ] || [ -L "$M1" ]; then
    if [ "$(realpath "$M1")" != "$(realpath "$INIT")" ]; then
      [ -n "$OVERWRITE" ] || { echo "error: INIT changed: this run's M1 is $(realpath "$M1"), INIT is" \
        "$(realpath "$INIT"); OVERWRITE=1 redoes the run from the new INIT (or use another RUN)" >&2; exit 1; }
      run rm -rf "$M1"
    fi
  fi
  [ -e "$M1" ] || run ln -s "$(realpath "$INIT")" "$M1"
else
  if [ -L "$M1" ]; then  # an earlier run of this RUN started from INIT
    [ -n "$OVERWRITE" ] || { echo "error: INIT changed: this run's M1 links to $(realpath "$M1") but INIT is not" \
      "set; set INIT to it, or OVERWRITE=1 to train M1 here" >&2; exit 1; }
    run rm "$M1"
  fi
  run env $TRAIN_ENV $TRAIN train_sft.py --model "$MODEL" --ift "$DATA/ift.jsonl" --eft "$DATA/eft.jsonl" \
      --out "$R/iter0/model" $PROMPTS $JUDGE_PROMPT $SRLM_SFT $SFT_ARGS $SEED_ARG $OW
fi
evaluate "$R/iter0/model"

# --- M_t -> M_{t+1}: search, pairs, Step-DPO (paper §3.3-3.4) ------------------------------------------------------
for t in $(seq 1 "$NUM_ITERS"); do
  prev=$R/iter$((t - 1))/model
  it=$R/iter$t
  if [ "$METHOD" = srlm ]; then  # k whole solutions, scored by M_t; the highest vs the lowest mean score
    sharded python generate.py --mode srlm --model "$prev" --questions "$DATA/questions$t.jsonl" \
        --out "$it/trees.jsonl" $PROMPTS $SRLM_JUDGE_PROMPT $SRLM_ARGS --engine "$ENGINE" $SEED_ARG $OW
    run python make_pairs.py --trees "$it/trees.jsonl" --out "$it/pairs.jsonl" --min-gap 0 $OW
  else
    sharded python generate.py --model "$prev" --questions "$DATA/questions$t.jsonl" --out "$it/trees.jsonl" \
        $PROMPTS $JUDGE_PROMPT $GEN_ARGS --judge "$JUDGE" --engine "$ENGINE" $SEED_ARG $OW
    run python make_pairs.py --trees "$it/trees.jsonl" --out "$it/pairs.jsonl" $OW
  fi
  run env $TRAIN_ENV $TRAIN train_step_dpo.py --model "$prev" --pairs "$it/pairs.jsonl" --out "$it/model" \
      $DPO_ARGS $SEED_ARG $OW
  evaluate "$it/model"
done

run python report.py --run "$R"
exit
}
