# PRESET=paper: the paper's setup (§2-§4) mapped onto our flags, for Qwen2.5-Math on GPUs.
# Sourced by iterate.sh; sets its stage flags, MODEL, DATA, DATA_SOURCE, DATA_ARGS and NPROC (settings only).
#   PRESET=paper RUN=qwen7b bash iterate.sh                      # every input by hub name
#   PRESET=paper SHARED=/path/to/copies RUN=qwen7b bash iterate.sh  # the data sets from a local folder of JSONL files
MODEL=${MODEL:-Qwen/Qwen2.5-Math-7B}             # M0: the base model, not -Instruct (paper §4); hub or local dir
DATA=${DATA:-data/real}
# Benchmarks and training sets: by default each comes from the hub (datasets.load_dataset, names and record mapping in
# prepare/paper_data.py: HUB_SETS), copied to $DATA/hub/ by the data step; SHARED=DIR reads a local folder of the same
# JSONL files instead (gsm8k/train.jsonl, math/test.jsonl, ..., prm800k/phase1_test_stepwise_critique.jsonl).
SHARED=${SHARED:-}
DATA_SOURCE=${SHARED:-hub}                       # prepare.paper_data --source
BENCH=${SHARED:-$DATA/hub}                       # where the benchmark files are once the data step has run
# iteration questions (paper: 400/800/1200 NuminaMath questions): MATH train problems, held out of IFT
DATA_ARGS="--question-source math --num-questions 400,800,1200"
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l || true)}  # a process per GPU: search/eval shards, DDP training
[ "$NPROC" -gt 0 ] || { echo "PRESET=paper: no GPU found (nvidia-smi -L); set NPROC to override" >&2; exit 1; }

# Generation memory, from scripts/estimate_memory.py's estimate for 7B in 4 bit + LoRA (not yet measured on a GPU):
# the peak is the prefill of ~1.5k-token judge prompts, 35 GiB for 64 of them at once. --prefill-chunk 256 runs
# each prompt's forward 256 tokens at a time (same texts; tests/test_search.py): 64 prompts ~15 GiB (fits 24 GB),
# 128 ~24 GiB (40 and 80 GB). The batch is picked by the smallest GPU's memory; set GEN_BATCH to override.
# The training batches below fit 24 GB: SFT 2 x 2,048 tokens ~13 GiB, Step-DPO 4 pairs x 2,048 ~16 GiB.
GPU_GIB=${GPU_GIB:-$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | sort -n | head -1 \
  | awk '{print int($1 / 1024)}')}
if [ "${GPU_GIB:-0}" -ge 36 ]; then GEN_BATCH=${GEN_BATCH:-128}; else GEN_BATCH=${GEN_BATCH:-64}; fi
PREFILL="--prefill-chunk 256"
# Generation engine: vLLM where it is installed (pip install -r requirements-vllm.txt; docs/vllm.md): the same
# search and evaluation, served with continuous batching and prefix caching (the judge prompts of a step share
# question and steps). It serves M_t as base + adapter; under --load-in-4bit, the base's NF4 weights dequantized to
# bf16 (written once per base model). --batch-size and --prefill-chunk then do nothing. ENGINE=hf forces HF generate.
ENGINE=${ENGINE:-$(python -c "import vllm" 2>/dev/null && echo vllm || echo hf)}

PROMPTS="--prompt-reasoning reasoning"           # Fig. 4
JUDGE_PROMPT="--prompt-judge judge"              # Fig. 5
# paper: full fine-tuning on 32 H100s. Here QLoRA (NF4 base + LoRA r=16, alpha=32 on every linear layer), so M_t is
# an adapter on M0; it is loaded in 4 bit everywhere (search, judge, DPO reference, evaluation): the model the adapter
# was trained on (without --load-in-4bit in GEN_ARGS/EVAL_ARGS: faster bf16 generation, a slightly different model).
# Batch 32 (paper §4, SFT and Step-DPO) = batch-size x grad-accum x processes, whatever the number of GPUs: each
# process takes 32 / NPROC examples per optimizer step, in micro-batches of at most 2 (SFT) or 4 (Step-DPO) that fit
# 24 GB. A GPU count that does not divide 32 cannot keep it: stop rather than train with another batch.
GLOBAL_BATCH=32
if [ $((GLOBAL_BATCH % NPROC)) -ne 0 ]; then
  echo "PRESET=paper: the paper's batch $GLOBAL_BATCH cannot be split evenly over NPROC=$NPROC processes; use 1, 2, 4," \
       "8, 16 or 32 GPUs (CUDA_VISIBLE_DEVICES=0,1,... selects them)" >&2
  exit 1
fi
PER_PROC=$((GLOBAL_BATCH / NPROC))
SFT_MICRO=$((PER_PROC < 2 ? PER_PROC : 2))
DPO_MICRO=$((PER_PROC < 4 ? PER_PROC : 4))
QLORA="--load-in-4bit --lora --lora-rank 16 --lora-alpha 32 --gradient-checkpointing"
# M1: paper 3 epochs at lr 1e-6 (full FT). LoRA's update is low-rank and scaled by alpha/r, so it needs a far larger
# rate: 1e-4 is QLoRA's usual SFT rate (Dettmers et al. 2023 used 1e-4..2e-4).
SFT_ARGS="$QLORA --lr 1e-4 --epochs 3 --batch-size $SFT_MICRO --grad-accum $((PER_PROC / SFT_MICRO)) --max-len 2048"
# search (§3.3, §4): w=6 candidates, T=0.5, top_p 0.95, at most 20 rounds. Token limits are ours (not stated).
GEN_ARGS="--load-in-4bit --num-candidates 6 --temperature 0.5 --top-p 0.95 --max-steps 20 --max-step-tokens 512 \
--judge-max-new-tokens 1024 --batch-size $GEN_BATCH --questions-per-chunk 32 $PREFILL"
# Step-DPO (§3.4): paper 1 epoch at lr 5e-7 (full FT), beta not stated (0.1; Step-DPO used 0.05-0.5). Under LoRA:
# 5e-6, 10x the full-FT rate for the same reason as above; LoRA/QLoRA DPO recipes use 5e-6..5e-5. A larger rate
# risks drifting far from pi_ref in one epoch: watch rewards/margins and the judge accuracy of M2.
DPO_ARGS="$QLORA --lr 5e-6 --beta 0.1 --epochs 1 --batch-size $DPO_MICRO --grad-accum $((PER_PROC / DPO_MICRO)) \
--max-len 2048"
# evaluation (Table 1): greedy, answer in the last \boxed{}, 2048 new tokens (Qwen2.5-Math math_eval.py's default).
EVAL_ARGS="--load-in-4bit --max-new-tokens 2048 --batch-size 64 $PREFILL"
JUDGE_EVAL_ARGS="--load-in-4bit --judge-max-new-tokens 1024 --batch-size $GEN_BATCH $PREFILL"  # as in the search
TRAIN="torchrun --standalone --nproc_per_node $NPROC"                    # DDP over the GPUs (1 GPU: one process)
# "MATH" = Qwen2.5-Math's `math` set, the full 5,000-problem MATH test (its `math500` is a separate set; the paper
# names the Qwen2.5-Math evaluation and says "MATH"). 76 of its problems are in our EFT data (below), as judge
# inputs only (the SFT loss masks prompts); 1 MATH train problem in IFT is also a MATH test problem.
EVAL_DATA=""
for name in gsm8k math gaokao2023en olympiadbench aime24 amc23; do EVAL_DATA+=" --data $BENCH/$name/test.jsonl"; done
JUDGE_EVAL_DATA="$DATA/eft_test.jsonl"   # step-judge accuracy on held-out PRM800K pairs
