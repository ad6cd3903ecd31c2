"""
Benchmark: which vLLM engine setting decides its speed on this machine? The greedy evaluation of scripts/bench_engines.py
(the reasoning prompt, greedy, --max-new-tokens) under several `LLM(...)` settings, one engine at a time (each started,
run --repeats times, shut down), next to HF generate run before the first and after the last engine; new tokens/s of
each (best of its runs), its ratio to HF's best, and how many texts equal HF's. Settings:
  issue      LLM(model, enforce_eager=True): vLLM's own defaults (dtype "auto", chunked prefill and prefix caching on)
  project    vllm_engine.engine_settings(): what the stages use (on CPU: float32, no chunked prefill, prefix caching)
  bfloat16   project, in bfloat16
  chunked    project, with chunked prefill
  no-prefix  project, without prefix caching
  seqs-512   project, 512 sequences per engine step (max_num_seqs; vLLM's CPU default is 256)
The engine core runs in the calling process (vllm_engine.engine_settings sets VLLM_ENABLE_V1_MULTIPROCESSING=0 on CPU
unless it is set): run with VLLM_ENABLE_V1_MULTIPROCESSING=1 for separate engine processes, as vLLM itself defaults to
(the issue's call as the issue ran it).

In the vLLM environment (docs/vllm.md), e.g. on the embedded default's M1:
    .venv-vllm/bin/python -m scripts.bench_vllm_settings --model runs/default/iter0/model \\
        --data data/synthetic/test.jsonl --out bench_vllm_settings.json
"""

import argparse
import datetime
import os
import platform
import time

import torch

import modeling
import vllm_engine
from common import chat_prompt, cli, load_prompt, read_jsonl, write_json
from scripts.bench_engines import evaluation_run


def settings(name):
    if name == "issue":
        return dict(enforce_eager=True)
    project = vllm_engine.engine_settings()
    changes = {"project": {}, "bfloat16": dict(dtype="bfloat16"), "chunked": dict(enable_chunked_prefill=True),
               "no-prefix": dict(enable_prefix_caching=False), "seqs-512": dict(max_num_seqs=512)}
    return {**project, **changes[name]}


def run_vllm(name, prompt_ids, tokenizer, args):
    from vllm import LLM, SamplingParams
    llm_args = settings(name)
    start = time.perf_counter()
    llm = LLM(model=args.model, max_model_len=args.max_model_len, **llm_args)
    row = dict(setting=name, llm_args={k: str(v) for k, v in llm_args.items()},
               engine_start_seconds=time.perf_counter() - start, dtype=str(llm.llm_engine.model_config.dtype),
               runs=[])
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0, detokenize=False)
    for _ in range(args.repeats):
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        row["runs"].append(tokens / (time.perf_counter() - start))
    row["tokens_per_s"] = max(row["runs"])
    texts = [tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True).strip() for o in outs]
    vllm_engine.shutdown(llm)
    return row, texts


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="evaluation problems {question, ...} (the synthetic test set)")
    p.add_argument("--limit", type=int, default=512, help="only the first N problems")
    p.add_argument("--max-new-tokens", type=int, default=160, help="as iterate.sh's EVAL_ARGS")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--hf-batch-size", type=int, default=128, help="HF generate's batch (the best of bench_engines)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each setting; the best counts")
    p.add_argument("--settings", default="issue,project,bfloat16,chunked,no-prefix,seqs-512")
    p.add_argument("--out", default="bench_vllm_settings.json")
    args = p.parse_args()
    names = args.settings.split(",")
    for name in names:
        settings(name)  # an unknown name fails here, before any engine starts
    torch.set_num_threads(1)  # as vLLM's CPU worker: one core computes, the other runs its scheduler
    hf, tokenizer = modeling.load_model(args.model)
    template = load_prompt("reasoning_tiny")
    prompts = [chat_prompt(tokenizer, template.format(problem=r["question"]))
               for r in read_jsonl(args.data, ["question"])[:args.limit]]
    prompt_ids = [tokenizer(x, add_special_tokens=False)["input_ids"] for x in prompts]
    hf_outs, before = evaluation_run(hf, tokenizer, prompts, args, args.hf_batch_size)
    hf_texts, first = [o["text"] for o in hf_outs], before["tokens_per_s"]
    rows = []
    for name in names:
        row, texts = run_vllm(name, prompt_ids, tokenizer, args)
        row["same_texts"] = sum(a == b for a, b in zip(texts, hf_texts))
        rows.append(row)
        print(f"{name}: {row['tokens_per_s']:.0f} tokens/s ({row['dtype']}), same texts {row['same_texts']}/"
              f"{len(prompts)}, engine start {row['engine_start_seconds']:.1f} s", flush=True)
    last = evaluation_run(hf, tokenizer, prompts, args, args.hf_batch_size)[1]["tokens_per_s"]
    hf_best = max(first, last)
    for row in rows:
        row["ratio_to_hf"] = row["tokens_per_s"] / hf_best
    print(f"HF batch {args.hf_batch_size}: {first:.0f} and {last:.0f} tokens/s (before, after); vLLM / HF best: " +
          ", ".join(f"{r['setting']} {r['ratio_to_hf']:.2f}x" for r in rows))
    write_json(args.out, dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              machine=f"{platform.node()}, {os.cpu_count()} CPUs", torch=torch.__version__,
                              in_process=os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0",
                              args=vars(args), hf_tokens_per_s=[first, last], settings=rows))


if __name__ == "__main__":
    cli(main)
