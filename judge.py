"""
Re-judge saved search trees (paper §3.1, Fig. 5; scores by Eqs. 1-5) with another model, prompt or setting.

The judge itself -- the pairwise prompt, the strict "[[A]]"/"[[B]]" verdict (anything else is unparseable: None,
counted, never a crash), the comparisons among w candidates and the win-count scores -- is shared with the search:
common.judge_candidates and common.parse_verdict score, modeling.judge_pairs writes the verdicts. The paper does not
say whether both orders (A,B) and (B,A) are judged. Default here: both (--orders 2), which cancels position bias and
measures it (the share of pairs whose two verdicts disagree); --orders 1 halves the cost.

This stage re-judges every step of a search-tree file (from generate.py), rescores, and writes a new tree file; the
chosen step is re-picked from the new scores, but the tree itself (which prefix each step was sampled from) is the
original search's: a re-judged tree is for analysis and for make_pairs.py.

Reads/writes the search-tree JSONL of generate.py (one record per question; see generate.py). Each judged step
gets: verdicts [{i, j, order, verdict, raw}], scores, chosen, best, worst, and the counts of unparsed verdicts.
Next to --out: <out>.config.json and, last, <out>.manifest.json (what made it; see common.is_done).

    python judge.py --model runs/default/iter1/model --trees runs/default/iter1/trees.jsonl \\
        --out runs/default/iter1/trees_rejudged.jsonl --prompt-judge judge_tiny
    python judge.py --judge random --trees ... --out ...     # the control: coin flips instead of the model
    python judge.py --judge oracle --trees ... --out ...     # the other control: the synthetic task's true labels
"""

import argparse
import random

from tqdm import tqdm

from common import (add_generation_args, add_judge_args, add_model_args, cli, is_done, judge_candidates, load_prompt,
                    output_flags, prompt_path, read_jsonl, save_config, sidecars, stage_manifest, write_jsonl,
                    write_manifest)
from modeling import load_model, verdict_fn


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, required=False)
    parser.add_argument("--trees", required=True, help="search-tree JSONL from generate.py")
    parser.add_argument("--out", required=True)
    add_judge_args(parser)
    add_generation_args(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    if args.judge == "model" and not args.model:
        parser.error("--model is needed with --judge model")
    inputs = dict(trees=args.trees, prompt_judge=prompt_path(args.prompt_judge),
                  model=args.model if args.judge == "model" else None)
    manifest = stage_manifest("judge", inputs, output_flags(args, "batch_size", "prefill_chunk"))
    if is_done(args.out, manifest, args.overwrite, sidecars(args.out)):
        return
    trees = read_jsonl(args.trees, {"id": (str, int), "question": str, "steps": list}, unique="id")
    model = tokenizer = None
    if args.judge == "model":
        model, tokenizer = load_model(args.model, load_in_4bit=args.load_in_4bit, attn=args.attn,
                                      prefill_chunk=args.prefill_chunk, engine=args.engine)
    jobs, where = [], []
    for t, tree in enumerate(trees):
        for s, node in enumerate(tree["steps"]):
            if len(node["candidates"]) >= 2:
                jobs.append((tree["question"], node["prefix_steps"], [c["text"] for c in node["candidates"]]))
                where.append((t, s))
    bar = tqdm(desc="judge verdicts", disable=not jobs)
    results = judge_candidates(jobs, verdict_fn(args, model, tokenizer, load_prompt(args.prompt_judge),
                                                random.Random(args.seed), bar), args.orders, not args.no_dedupe)
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
    write_manifest(args.out, manifest)


if __name__ == "__main__":
    cli(main)
