"""
The judge's cost levers, each measured for what it saves and what it costs in judging, on one model:
  --orders 1 instead of 2 (each pair judged once, in one order), a cap on the explanation (--judge-max-new-tokens),
  and stopping right after the verdict (--stop-at-verdict: the judge's first [[A]]/[[B]] ends its text).
Settings: the baseline (both orders, --judge-max-new-tokens, writing on after the verdict), each lever alone (each
--caps value alone), and one order with the stop at the verdict together. For each:
  effect: the judge's accuracy on held-out EFT pairs (evaluate.py --judge-eval's measure; with both orders a pair
          counts as right when the right step wins more of its two comparisons, as the search's win count decides;
          an unparsed verdict or a 1-1 split counts as wrong);
  cost:   generated judge tokens and seconds per EFT pair; and from a search over --questions with that setting
          (generate.py's search from one seed; the candidates are sampled as in the loop): judge comparisons,
          generated judge tokens and judge seconds per question, tie roll-backs, unparsed verdicts.
Not measured here: the loop's accuracy after Step-DPO on each setting's pairs (iterate.sh, GEN_ARGS per setting).

    python -m scripts.judge_levers --model runs/default/iter0/model --eft data/synthetic/eft_test.jsonl \\
        --questions data/synthetic/questions1.jsonl --caps 32 --out judge_levers.json      # [--engine vllm]
Paper scale: --prompt-reasoning reasoning --prompt-judge judge --judge-max-new-tokens 1024 --caps 256,512
--max-step-tokens 512 (and --load-in-4bit, as the preset runs the judge).
"""

import argparse
import datetime
import math
import time

import modeling
import step_search
from common import (add_generation_args, add_model_args, cli, judge_context, load_prompt, read_jsonl, search_stats,
                    write_json)
from scripts.bench_engines import count_generate_calls


def settings(baseline_tokens, caps):
    """
    (name, orders, judge_max_new_tokens, stop_at_verdict): the baseline, each lever alone, and the two that cannot
    cut a verdict short together (a cap can: a judge whose explanation is longer loses its verdict).
    """
    rows = [("baseline", 2, baseline_tokens, False), ("orders 1", 1, baseline_tokens, False)]
    rows += [(f"cap {cap}", 2, cap, False) for cap in caps]
    rows += [("stop at verdict", 2, baseline_tokens, True), ("orders 1 + stop", 1, baseline_tokens, True)]
    return rows


def eft_accuracy(model, tokenizer, template, pairs, orders, max_new_tokens, stop, args, calls):
    """The judge on EFT pairs in one or both orders -> accuracy, unparsed, split (1-1) share, tokens and seconds."""
    items = [(judge_context(p["question"], p["previous_steps"]), p["step_a"], p["step_b"]) for p in pairs]
    if orders == 2:
        items += [(context, b, a) for context, a, b in items]  # the swap: step_b shown as A
    del calls[:]
    verdicts = modeling.judge_pairs(model, tokenizer, template, items, max_new_tokens, args.batch_size,
                                    stop_at_verdict=stop)
    right = unparsed = split = 0
    n = len(pairs)
    for k, p in enumerate(pairs):
        wins = {"A": 0, "B": 0}  # wins of step_a ("A") and step_b ("B")
        for order in range(orders):
            verdict = verdicts[k + order * n][0]
            unparsed += verdict is None
            if verdict is not None:
                wins[verdict if order == 0 else {"A": "B", "B": "A"}[verdict]] += 1
        other = "B" if p["label"] == "A" else "A"
        right += wins[p["label"]] > wins[other]
        split += orders == 2 and wins["A"] == wins["B"] == 1
    tokens, seconds = sum(c[2] for c in calls), sum(c[3] for c in calls)
    accuracy = right / n
    return dict(n=n, judge_accuracy=accuracy, judge_accuracy_se=math.sqrt(accuracy * (1 - accuracy) / n),
                unparsed_share=unparsed / (n * orders), split_share=split / n,
                tokens_per_pair=tokens / n, seconds_per_pair=seconds / n)


def search_cost(model, tokenizer, records, orders, max_new_tokens, stop, args, calls):
    """generate.py's search with this judge setting -> judge comparisons, tokens and seconds per question."""
    search_args = argparse.Namespace(prompt_reasoning=args.prompt_reasoning, prompt_judge=args.prompt_judge,
                                     num_candidates=args.num_candidates, temperature=0.5, top_p=0.95, max_steps=20,
                                     max_step_tokens=args.max_step_tokens, judge_max_new_tokens=max_new_tokens,
                                     batch_size=args.batch_size, orders=orders, judge="model", no_dedupe=False,
                                     stop_at_verdict=stop, seed=args.seed)
    del calls[:]
    trees = step_search.search(model, tokenizer, records, [str(r.get("id", i)) for i, r in enumerate(records)],
                                search_args, argparse.Namespace(update=lambda n: None))
    judge = [c for c in calls if c[1] == "judge"]
    stats, n = search_stats(trees), len(records)
    return dict(questions=n, comparisons_per_question=stats["verdicts"] / n,
                judge_tokens_per_question=sum(c[2] for c in judge) / n,
                judge_seconds_per_question=sum(c[3] for c in judge) / n, tie_rollbacks=stats["tie_rollbacks"],
                unparsed_share=stats["unparsed"] / max(1, stats["verdicts"]),
                steps_per_solution=stats["steps_per_solution"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_generation_args(p)
    p.add_argument("--eft", required=True, help="EFT test pairs {question, previous_steps, step_a, step_b, label}")
    p.add_argument("--eft-limit", type=int, default=None)
    p.add_argument("--questions", help="search questions for the per-question cost (none: EFT pairs only)")
    p.add_argument("--questions-limit", type=int, default=60)
    p.add_argument("--judge-max-new-tokens", type=int, default=64, help="the baseline's cap (the tiny default's)")
    p.add_argument("--caps", default="32", help="comma-separated: each a lower cap on the explanation")
    p.add_argument("--prompt-reasoning", default="reasoning_tiny")
    p.add_argument("--prompt-judge", default="judge_tiny")
    p.add_argument("--num-candidates", type=int, default=6)
    p.add_argument("--max-step-tokens", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="judge_levers.json")
    args = p.parse_args()
    calls = count_generate_calls()
    pairs = read_jsonl(args.eft, ["question", "previous_steps", "step_a", "step_b", "label"])[:args.eft_limit]
    records = read_jsonl(args.questions, ["question"])[:args.questions_limit] if args.questions else []
    model, tokenizer = modeling.load_model(args.model, load_in_4bit=args.load_in_4bit, attn=args.attn,
                                           prefill_chunk=args.prefill_chunk, engine=args.engine)
    template = load_prompt(args.prompt_judge)
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), args=vars(args),
                  settings=[])
    start = time.perf_counter()
    caps = [int(c) for c in args.caps.split(",") if c.strip()]
    for name, orders, max_new_tokens, stop in settings(args.judge_max_new_tokens, caps):
        row = dict(setting=name, orders=orders, judge_max_new_tokens=max_new_tokens, stop_at_verdict=stop,
                   eft=eft_accuracy(model, tokenizer, template, pairs, orders, max_new_tokens, stop, args, calls))
        if records:
            row["search"] = search_cost(model, tokenizer, records, orders, max_new_tokens, stop, args, calls)
        result["settings"].append(row)
        write_json(args.out, result)
        search = row.get("search", {})
        print(f"{name:<16} judge accuracy {row['eft']['judge_accuracy']:.3f} ± {row['eft']['judge_accuracy_se']:.3f} "
              f"(split {row['eft']['split_share']:.3f}, unparsed {row['eft']['unparsed_share']:.3f}); "
              f"{row['eft']['tokens_per_pair']:.1f} tokens/pair; search: "
              f"{search.get('judge_tokens_per_question', float('nan')):.0f} judge tokens/question, "
              f"{search.get('judge_seconds_per_question', float('nan')):.3f} s/question", flush=True)
    result["seconds"] = time.perf_counter() - start
    write_json(args.out, result)


if __name__ == "__main__":
    cli(main)
