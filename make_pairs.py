"""
Search trees -> step-level preference pairs (paper §3.3, Fig. 1: {x, s_1..s_{l-1}, s_l^best, s_l^worst}).

One pair per judged step: the best-scored candidate (chosen) against the worst (rejected), given the question and
the steps before it. The paper's rules: no pair from an all-tie step, and the pair of a step discarded by a
roll-back is dropped too. Left open by the paper, chosen here (flags):
  --min-gap 1          best and worst must differ by at least this many wins (1 = any non-tie); the mean 0-5
                       scores of generate.py --mode srlm (whole solutions, prefix "") want --min-gap 0
  --ties first         several candidates share the best (or worst) score: take the first, i.e. a random one,
                       since candidates are i.i.d. samples (--ties skip drops such steps)
  dedupe               identical (prompt, prefix, chosen, rejected) pairs are kept once
  --only-finished      keep pairs only from searches that reached an answer (default: all, as the paper keeps pairs
                       as the search goes)
  final-step EOS       decided in train_step_dpo.py; here each side records whether it ended the solution
                       (`_final`: it holds \\boxed{} or ended with EOS) and whether the model emitted EOS after it
                       (`_eos`; a step with \\boxed{} cut at the next "Step" marker or at the token limit has none)

Reads  --trees JSONL (generate.py). Writes --out JSONL:
  {id, question_id, step, prompt, prefix, chosen, rejected, chosen_final, rejected_final, chosen_eos, rejected_eos,
   chosen_score, rejected_score}     prefix = the previous steps, joined as the model saw them ("Step 1: ...\\n...")
and <out>.stats.json with the counts below (pairs per question, why steps gave no pair), <out>.config.json and,
written last, <out>.manifest.json (the trees by content and the flags; a rerun skips only when they match).

    python make_pairs.py --trees runs/default/iter1/trees.jsonl --out runs/default/iter1/pairs.jsonl
"""

import argparse
from collections import Counter

from common import (DataError, cli, is_done, join_steps, nonnegative_int, output_flags, read_jsonl, save_config,
                    sidecars, stage_manifest, write_json, write_jsonl, write_manifest)

TREE_FIELDS = {"id": (str, int), "question": str, "prompt": str, "steps": list, "finished": bool,
               "stop_reason": (str, type(None))}
NODE_FIELDS = ["step", "prefix_steps", "candidates", "scores", "best", "worst", "outcome", "rolled_back"]


def pair_from_node(tree, node, min_gap, ties):
    """(pair, None) or (None, reason it gives no pair)."""
    if node["outcome"] == "tie_rollback":
        return None, "all candidates tied (roll-back)"
    if node["outcome"] == "tie":  # generate.py --mode srlm: every scored solution got the same mean score
        return None, "all solutions scored the same"
    if node["outcome"] == "unscored":  # generate.py --mode srlm: no scoring of any solution could be parsed
        return None, "no solution scored"
    if node["outcome"] in ("single", "empty"):
        return None, "one distinct candidate" if node["outcome"] == "single" else "no candidates"
    if node["rolled_back"]:
        return None, "step discarded by a later roll-back"
    scores = node["scores"]
    best, worst = node["best"], node["worst"]
    if best is None or worst is None:  # a tree re-judged by judge.py can tie where the search did not
        return None, "all candidates tied (re-judged)" if node.get("tie") else "one distinct candidate"
    if scores[best] - scores[worst] < min_gap:
        return None, f"score gap below --min-gap {min_gap}"
    texts = [c["text"] for c in node["candidates"]]
    distinct_best = {texts[i] for i, s in enumerate(scores) if s == scores[best]}
    distinct_worst = {texts[i] for i, s in enumerate(scores) if s == scores[worst]}
    if ties == "skip" and (len(distinct_best) > 1 or len(distinct_worst) > 1):
        return None, "tie for best or worst (--ties skip)"
    chosen, rejected = node["candidates"][best], node["candidates"][worst]
    return dict(id=f"{tree['id']}-step{node['step']}-round{node['round']}", question_id=tree["id"],
                step=node["step"], prompt=tree["prompt"], prefix=join_steps(node["prefix_steps"]),
                chosen=chosen["text"], rejected=rejected["text"], chosen_final=chosen["final"],
                rejected_final=rejected["final"], chosen_eos=chosen["eos"], rejected_eos=rejected["eos"],
                chosen_score=scores[best], rejected_score=scores[worst]), None


def make_pairs(trees, min_gap=1, ties="first", only_finished=False):
    pairs, dropped, seen = [], Counter(), set()
    for tree in trees:
        if only_finished and tree["stop_reason"] not in ("answer", "eos"):
            dropped["search did not finish (--only-finished)"] += len(tree["steps"])
            continue
        for node in tree["steps"]:
            pair, reason = pair_from_node(tree, node, min_gap, ties)
            if pair is None:
                dropped[reason] += 1
                continue
            key = (pair["prompt"], pair["prefix"], pair["chosen"], pair["rejected"])
            if key in seen:
                dropped["duplicate pair"] += 1
                continue
            seen.add(key)
            pairs.append(pair)
    return pairs, dropped


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--min-gap", type=nonnegative_int, default=1)
    parser.add_argument("--ties", default="first", choices=["first", "skip"])
    parser.add_argument("--only-finished", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    manifest = stage_manifest("make_pairs", dict(trees=args.trees), output_flags(args))
    if is_done(args.out, manifest, args.overwrite, sidecars(args.out)):
        return
    trees = read_jsonl(args.trees, TREE_FIELDS, unique="id")
    for lineno, t in enumerate(trees, 1):
        for k, node in enumerate(t["steps"]):
            missing = [f for f in NODE_FIELDS if f not in node]
            if missing:
                raise DataError(f"{args.trees}:{lineno}: steps[{k}] is missing field(s) {missing}")
    pairs, dropped = make_pairs(trees, args.min_gap, args.ties, args.only_finished)
    per_question = Counter(p["question_id"] for p in pairs)
    hist = Counter(per_question.get(t["id"], 0) for t in trees)
    stats = dict(questions=len(trees), pairs=len(pairs), pairs_per_question=len(pairs) / max(1, len(trees)),
                 questions_by_pair_count=dict(sorted(hist.items())), steps_without_pair=dict(dropped))
    write_jsonl(args.out, pairs)
    write_json(args.out + ".stats.json", stats)
    save_config(args, args.out + ".config.json")
    write_manifest(args.out, manifest)
    print(f"{len(pairs)} pairs from {len(trees)} questions ({stats['pairs_per_question']:.2f} per question)")
    print(f"questions by number of pairs: {stats['questions_by_pair_count']}")
    for reason, n in dropped.most_common():
        print(f"  no pair: {n:5d}  {reason}")


if __name__ == "__main__":
    cli(main)
