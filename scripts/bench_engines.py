"""
Benchmark: the two generation engines (--engine hf | vllm) on the same work in one run, the engines taking turns
--repeats times (a shared machine's changing load then weighs on both alike; the best run of each is compared, and
the ratio is the result, not the absolute speeds):
  1. greedy evaluation (evaluate.py's solve: the reasoning prompt, greedy, --max-new-tokens) of the --data
     problems: HF generate at each --hf-batch-sizes, and vLLM; new tokens/s of each, and how many outputs (text,
     eos flag and new-token count) and texts are the same from both engines;
  2. the search (generate.py's search: w sampled candidates per step, each stopped at the next step marker, and the
     model judging them) on the --questions: new tokens/s of candidates and judge together, and of each apart.
The vLLM engine's start (spawning its processes, loading, the KV cache) is timed apart and not in the tokens/s.
Tokens are counted as the stages count them (modeling.generate's new_tokens: generated up to and including EOS),
seconds are wall-clock seconds inside the generate calls (the search's own bookkeeping is in neither).

In the vLLM environment (docs/vllm.md), e.g. on the embedded default's M1:
    .venv-vllm/bin/python -m scripts.bench_engines --model runs/default/iter0/model \\
        --data data/synthetic/test.jsonl --questions data/synthetic/questions3.jsonl --out bench_engines.json
"""

import argparse
import datetime
import os
import platform
import time

import torch

import modeling
import step_search
from common import chat_prompt, cli, load_prompt, read_jsonl, write_json


def count_generate_calls():
    """
    Route every modeling.generate call through a counter; returns the list it appends (engine, kind, new tokens,
    seconds) to, kind "candidates" for one-step calls (the search's candidates), else "judge" (in the search, the
    only other calls: modeling.judge_pairs). A measuring tool's patch: the stages themselves are unchanged.
    """
    calls, plain = [], modeling.generate

    def counted(model, tokenizer, prompts, max_new_tokens, *args, **kwargs):
        start = time.perf_counter()
        outs = plain(model, tokenizer, prompts, max_new_tokens, *args, **kwargs)
        calls.append((getattr(model, "engine", "hf"), "candidates" if kwargs.get("one_step") else "judge",
                      sum(o["new_tokens"] for o in outs),
                      time.perf_counter() - start))
        return outs

    modeling.generate = step_search.generate = counted  # the names judge_pairs and the search call
    return calls


def evaluation_run(model, tokenizer, prompts, args, batch_size):
    start = time.perf_counter()
    outs = modeling.generate(model, tokenizer, prompts, args.max_new_tokens, batch_size=batch_size)
    seconds = time.perf_counter() - start
    tokens = sum(o["new_tokens"] for o in outs)
    return outs, dict(batch_size=batch_size, seconds=seconds, new_tokens=tokens, tokens_per_s=tokens / seconds,
                      torch_threads=torch.get_num_threads())


def search_run(model, tokenizer, records, args, engine, calls):
    """generate.py's search over all questions, in chunks of --questions-per-chunk; tokens/s of its generate calls."""
    search_args = argparse.Namespace(prompt_reasoning=args.prompt_reasoning, prompt_judge=args.prompt_judge,
                                     num_candidates=args.num_candidates, temperature=0.5, top_p=0.95, max_steps=20,
                                     max_step_tokens=args.max_step_tokens,
                                     judge_max_new_tokens=args.judge_max_new_tokens,
                                     batch_size=args.search_batch_size, orders=args.orders, judge="model",
                                     no_dedupe=False, stop_at_verdict=False, seed=0)
    del calls[:]
    start = time.perf_counter()
    trees = []
    per_chunk = args.questions_per_chunk or len(records)
    for c in range(0, len(records), per_chunk):
        chunk = records[c:c + per_chunk]
        trees += step_search.search(model, tokenizer, chunk, [r["id"] for r in chunk], search_args,
                                     argparse.Namespace(update=lambda n: None))
    wall = time.perf_counter() - start
    row = dict(engine=engine, questions=len(records), questions_per_chunk=per_chunk, load_average=os.getloadavg()[0],
               batch_size=args.search_batch_size, wall_seconds=wall, rounds=sum(t["rounds"] for t in trees),
               finished_with_answer=sum(t["stop_reason"] == "answer" for t in trees))
    for kind in ["candidates", "judge", "all"]:
        these = [c for c in calls if kind == "all" or c[1] == kind]
        tokens, seconds = sum(c[2] for c in these), sum(c[3] for c in these)
        row[kind] = dict(calls=len(these), new_tokens=tokens, seconds=seconds,
                         tokens_per_s=tokens / seconds if seconds else None)
    return row


def best(rows):
    return max(rows, key=lambda r: r["tokens_per_s"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="evaluation problems {question, ...} (the synthetic test set)")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--max-new-tokens", type=int, default=160, help="as iterate.sh's EVAL_ARGS")
    p.add_argument("--hf-batch-sizes", default="64,128,256", help="HF generate at each; the best is compared")
    p.add_argument("--hf-threads", type=int, default=1, help="torch threads of HF generate (vLLM's CPU worker "
                   "computes on one core and keeps the other for its scheduler)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each engine, alternating; the best counts")
    p.add_argument("--questions", help="search questions (skip the search benchmark if not given)")
    p.add_argument("--questions-limit", type=int, default=None)
    p.add_argument("--questions-per-chunk", type=int, default=0, help="questions searched together (0: all)")
    p.add_argument("--search-batch-size", type=int, default=128, help="HF: as iterate.sh's GEN_ARGS")
    p.add_argument("--num-candidates", type=int, default=6)
    p.add_argument("--orders", type=int, default=1)
    p.add_argument("--max-step-tokens", type=int, default=40)
    p.add_argument("--judge-max-new-tokens", type=int, default=64)
    p.add_argument("--prompt-reasoning", default="reasoning_tiny")
    p.add_argument("--prompt-judge", default="judge_tiny")
    p.add_argument("--out", default="bench_engines.json")
    args = p.parse_args()
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  machine=f"{platform.node()}, {os.cpu_count()} CPUs", torch=torch.__version__, args=vars(args))
    calls = count_generate_calls()
    template = load_prompt(args.prompt_reasoning)
    items = read_jsonl(args.data, ["question"])[:args.limit]
    questions = read_jsonl(args.questions, ["question"])[:args.questions_limit] if args.questions else []
    for i, q in enumerate(questions):
        q.setdefault("id", str(i))

    torch.set_num_threads(args.hf_threads)
    hf, tokenizer = modeling.load_model(args.model)
    start = time.perf_counter()
    vllm, _ = modeling.load_model(args.model, engine="vllm")
    result["vllm_engine_start_seconds"] = time.perf_counter() - start
    print(f"vllm engine start: {result['vllm_engine_start_seconds']:.1f} s", flush=True)
    prompts = [chat_prompt(tokenizer, template.format(problem=it["question"])) for it in items]
    for model in (hf, vllm):
        modeling.generate(model, tokenizer, prompts[:8], 8)  # warm-up

    # 1. greedy evaluation, the engines alternating so that a change in the machine's load weighs on both
    rows, outs = dict(hf=[], vllm=[]), {}
    for _ in range(args.repeats):
        for engine, model, batch_sizes in [("hf", hf, [int(b) for b in args.hf_batch_sizes.split(",")]),
                                           ("vllm", vllm, [None])]:
            for batch_size in batch_sizes:
                outs[engine], row = evaluation_run(model, tokenizer, prompts, args, batch_size)
                row["load_average"] = os.getloadavg()[0]
                rows[engine].append(row)
                print(f"evaluation, {engine}, batch {batch_size}: {row['new_tokens']} tokens in "
                      f"{row['seconds']:.1f} s, {row['tokens_per_s']:.0f} tokens/s", flush=True)
    same = [a == b for a, b in zip(outs["hf"], outs["vllm"])]
    result["evaluation"] = dict(problems=len(prompts), runs=rows, best_hf=best(rows["hf"]),
                                best_vllm=best(rows["vllm"]),
                                speedup=best(rows["vllm"])["tokens_per_s"] / best(rows["hf"])["tokens_per_s"],
                                same_outputs=sum(same),
                                same_texts=sum(a["text"] == b["text"] for a, b in zip(outs["hf"], outs["vllm"])),
                                different=[dict(i=i, hf=outs["hf"][i], vllm=outs["vllm"][i])
                                           for i, s in enumerate(same) if not s][:20])
    print(f"evaluation: best vllm / best hf = {result['evaluation']['speedup']:.2f}x; same outputs "
          f"{sum(same)}/{len(prompts)}", flush=True)

    # 2. the search (candidates + judge), alternating likewise
    if questions:
        runs = dict(hf=[], vllm=[])
        for _ in range(args.repeats):
            for engine, model in [("hf", hf), ("vllm", vllm)]:
                runs[engine].append(search_run(model, tokenizer, questions, args, engine, calls))
                r = runs[engine][-1]
                print(f"search, {engine}: {r['all']['new_tokens']} tokens in {r['all']['seconds']:.1f} s, "
                      f"{r['all']['tokens_per_s']:.0f} tokens/s (candidates {r['candidates']['tokens_per_s']:.0f}, "
                      f"judge {r['judge']['tokens_per_s']:.0f})", flush=True)
        result["search"] = dict(runs=runs)
        for kind in ["candidates", "judge", "all"]:
            top = {e: max(r[kind]["tokens_per_s"] for r in runs[e]) for e in runs}
            result["search"][kind] = dict(best_hf_tokens_per_s=top["hf"], best_vllm_tokens_per_s=top["vllm"],
                                          speedup=top["vllm"] / top["hf"])
        print("search: best vllm / best hf tokens/s: " + ", ".join(
            f"{k} {result['search'][k]['speedup']:.2f}x" for k in ["candidates", "judge", "all"]))
    write_json(args.out, result)


if __name__ == "__main__":
    cli(main)
