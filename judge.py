"""
Step-wise pairwise LLM-as-a-Judge (paper §3.1, Fig. 5) and the win-count scores of the step search (Eqs. 1-5).

The model sees the question, the steps so far and two candidate next steps, writes an explanation and a verdict
"[[A]]" or "[[B]]". Parsing is strict: anything else is an unparseable verdict (None), counted, never a crash.
The paper does not say whether both orders (A,B) and (B,A) are judged. Default here: both (--orders 2), which
cancels position bias and measures it (the share of pairs whose two verdicts disagree); --orders 1 halves the cost.

As a library: generate.py calls `judge_candidates` at every search step.
As a CLI: re-judge every step of a search-tree file (from generate.py) with another model, prompt or setting,
rescore, and write a new tree file; the chosen step is re-picked from the new scores, but the tree itself (which
prefix each step was sampled from) is the original search's: a re-judged tree is for analysis and for make_pairs.

Reads/writes the search-tree JSONL of generate.py (one record per question; see generate.py). Each judged step
gets: verdicts [{i, j, order, verdict, raw}], scores, chosen, best, worst, and the counts of unparsed verdicts.

    python judge.py --model runs/default/iter1/model --trees runs/default/iter1/trees.jsonl \\
        --out runs/default/iter1/trees_rejudged.jsonl --prompt-judge judge_tiny
    python judge.py --judge random --trees ... --out ...     # the control: coin flips instead of the model
    python judge.py --judge oracle --trees ... --out ...     # the other control: the synthetic task's true labels
"""

import argparse
import itertools
import random
import re

from tqdm import tqdm

from common import (chat_prompt, generate, judge_context, load_model, load_prompt, read_jsonl, save_config,
                    skip_if_done, write_jsonl)
from prepare_synthetic import step_is_right

VERDICT = re.compile(r"\[\[([AB])\]\]")


def parse_verdict(text):
    """'[[A]]' -> 'A', '[[B]]' -> 'B'; none, or both letters present -> None (unparseable)."""
    found = set(VERDICT.findall(text))
    return found.pop() if len(found) == 1 else None


def judge_pairs(model, tokenizer, template, items, max_new_tokens=256, batch_size=64, progress=None):
    """items: [(context, step_a, step_b)] -> [(verdict or None, raw judge text)], one batched generate call."""
    prompts = [chat_prompt(tokenizer, template.format(context=c, step_a=a, step_b=b)) for c, a, b in items]
    outs = generate(model, tokenizer, prompts, max_new_tokens, temperature=0.0, batch_size=batch_size,
                    progress=progress)  # judge decoding is not given by the paper: greedy here
    return [(parse_verdict(o["text"]), o["text"]) for o in outs]


def pairs_to_judge(num_candidates, orders):
    """All (i, j, order) comparisons among w candidates: i shown as A and j as B, plus the swap if orders == 2."""
    pairs = []
    for i, j in itertools.combinations(range(num_candidates), 2):
        pairs.append((i, j, "ab"))
        if orders == 2:
            pairs.append((j, i, "ba"))
    return pairs


def win_counts(num_candidates, verdicts):
    """
    Eqs. 1-5: the score of candidate i is its number of pairwise wins. verdicts: [(i, j, verdict)] where i was
    shown as A and j as B. With both orders judged each unordered pair is worth up to 2 wins. An unparseable verdict
    gives no win to either side (the paper does not say; a flag-free choice that only costs that comparison).
    """
    scores = [0] * num_candidates
    for i, j, verdict in verdicts:
        if verdict == "A":
            scores[i] += 1
        elif verdict == "B":
            scores[j] += 1
    return scores


def best_and_worst(scores):
    """argmax / argmin of the scores, first index on ties (the paper leaves ties open); None if all are equal."""
    if max(scores) == min(scores):
        return None, None  # all tied: the search rolls back (paper §3.3)
    return scores.index(max(scores)), scores.index(min(scores))


def distinct_candidates(texts):
    """Indices of the first occurrence of each distinct candidate text."""
    first = {}
    for i, t in enumerate(texts):
        first.setdefault(t, i)
    return sorted(first.values())


def oracle_verdict(right_a, right_b, rng):
    """
    --judge oracle, the synthetic task only: the step that is right (prepare_synthetic.step_is_right) wins; two
    right or two wrong steps get a coin flip, as a judge that must answer would. Not the paper's method: the upper
    bound of any self-judge, which tells a failure of the judge from a failure of Step-DPO.
    """
    return ("A" if right_a else "B") if right_a != right_b else rng.choice("AB")


def judge_candidates(model, tokenizer, template, jobs, orders=2, judge="model", rng=None, dedupe=True,
                     max_new_tokens=256, batch_size=64, progress=None):
    """
    jobs: [(question, previous_steps, candidate_texts)] -> per job a dict with
      judged (candidate indices compared), verdicts [{i, j, order, verdict, raw}], scores (wins, per candidate),
      best, worst (None if all tie, or worst None if only one distinct candidate), tie, unparsed.
    All comparisons of all jobs go into one batched generation. judge="random" flips a coin per comparison;
    judge="oracle" knows the synthetic task's arithmetic (oracle_verdict).
    dedupe (deviation; the paper judges all w candidates): identical candidates are judged once and share a score.
    They carry no preference, and identical texts judged in both orders always tie, which would trigger the
    roll-back on exactly the steps the model is surest of.
    """
    flat, index, judged = [], [], []
    for k, (question, previous, candidates) in enumerate(jobs):
        keep = distinct_candidates(candidates) if dedupe else list(range(len(candidates)))
        judged.append(keep)
        context = judge_context(question, previous)
        for a, b, order in pairs_to_judge(len(keep), orders):
            flat.append((context, candidates[keep[a]], candidates[keep[b]]))
            index.append((k, keep[a], keep[b], order))
    if judge == "random":
        results = [(rng.choice("AB"), "random") for _ in flat]
    elif judge == "oracle":  # each candidate checked once, not once per comparison
        right = [[step_is_right(question, len(previous) + 1, c) for c in candidates]
                 for question, previous, candidates in jobs]
        results = [(oracle_verdict(right[k][i], right[k][j], rng), "oracle") for k, i, j, _ in index]
    else:
        results = judge_pairs(model, tokenizer, template, flat, max_new_tokens, batch_size, progress)
    out = [dict(judged=keep, verdicts=[], unparsed=0) for keep in judged]
    for (k, i, j, order), (verdict, raw) in zip(index, results):
        out[k]["verdicts"].append(dict(i=i, j=j, order=order, verdict=verdict, raw=raw))
        out[k]["unparsed"] += verdict is None
    for (question, previous, candidates), o in zip(jobs, out):
        keep = o["judged"]
        wins = win_counts(len(candidates), [(v["i"], v["j"], v["verdict"]) for v in o["verdicts"]])
        rep = {t: i for i, t in reversed(list(enumerate(candidates)))} if dedupe else None
        o["scores"] = [wins[rep[t]] for t in candidates] if dedupe else wins
        if len(keep) == 1:  # one distinct candidate: nothing to compare, it is the step
            o["best"], o["worst"], o["tie"] = keep[0], None, False
        elif not keep:
            o["best"], o["worst"], o["tie"] = None, None, False
        else:
            best, worst = best_and_worst([wins[i] for i in keep])
            o["tie"] = best is None
            o["best"], o["worst"] = (None, None) if o["tie"] else (keep[best], keep[worst])
    return out


def order_disagreement(verdict_list):
    """Share of unordered pairs judged in both orders whose two verdicts name different candidates."""
    by_pair = {}
    for v in verdict_list:
        winner = {"A": v["i"], "B": v["j"]}.get(v["verdict"])
        by_pair.setdefault((min(v["i"], v["j"]), max(v["i"], v["j"])), []).append(winner)
    both = [w for w in by_pair.values() if len(w) == 2 and None not in w]
    return sum(w[0] != w[1] for w in both) / len(both) if both else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="the judge model (required with --judge model)")
    parser.add_argument("--trees", required=True, help="search-tree JSONL from generate.py")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompt-judge", default="judge", help="paper Fig. 5; the tiny default: judge_tiny")
    parser.add_argument("--judge", default="model", choices=["model", "random", "oracle"],
                        help="random: coin flips; oracle: the synthetic task's arithmetic (controls, not the method)")
    parser.add_argument("--orders", type=int, default=2, choices=[1, 2], help="judge (A,B) and (B,A), or one order")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--prefill-chunk", type=int, default=0,
                        help="prompt tokens per prefill forward (0: all at once); caps the prefill's "
                             "activations, the memory peak of large batches (README, GPU section)")
    parser.add_argument("--load-in-4bit", action="store_true")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--no-dedupe", action="store_true", help="judge identical candidates too (paper)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    if skip_if_done(args.out, args.overwrite):
        return
    trees = read_jsonl(args.trees, ["id", "question", "steps"])
    model = tokenizer = None
    if args.judge == "model":
        model, tokenizer = load_model(args.model, load_in_4bit=args.load_in_4bit, attn=args.attn)
        if args.prefill_chunk:  # HF generate's chunked prefill
            model.generation_config.prefill_chunk_size = args.prefill_chunk
    template, rng = load_prompt(args.prompt_judge), random.Random(args.seed)
    jobs, where = [], []
    for t, tree in enumerate(trees):
        for s, node in enumerate(tree["steps"]):
            if len(node["candidates"]) >= 2:
                jobs.append((tree["question"], node["prefix_steps"], [c["text"] for c in node["candidates"]]))
                where.append((t, s))
    bar = tqdm(desc="judge verdicts", disable=not jobs)
    results = judge_candidates(model, tokenizer, template, jobs, args.orders, args.judge, rng,
                               not args.no_dedupe, args.max_new_tokens, args.batch_size, bar)
    bar.close()
    for (t, s), res in zip(where, results):
        node = trees[t]["steps"][s]
        node.update(res)
        node["chosen"] = res["best"]
    unparsed = sum(r["unparsed"] for r in results)
    total = sum(len(r["verdicts"]) for r in results)
    print(f"re-judged {len(jobs)} steps: {total} verdicts, {unparsed} unparseable")
    write_jsonl(args.out, trees)
    save_config(args, args.out + ".config.json")


if __name__ == "__main__":
    main()
