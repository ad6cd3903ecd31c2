"""
Step-by-step search with self-judging (paper §3.3): M_t builds its own step-level preferences, with no labels.
The search itself is step_search.py (shared with evaluate.py --search): for every question, at each step, w
candidate next steps sampled from M_t (T=0.5, top_p=0.95), every pair judged by M_t with the pairwise judge prompt,
score = number of wins (Eqs. 1-5), the best appended; (best, worst) is the step's preference pair; an all-tie rolls
back one step (its pair dropped). All unfinished questions of a chunk advance together.

Every random draw is seeded by its question: candidate c of round r of question q samples from a generator seeded
by (--seed, q, r, c) (modeling.SeededGumbel), and the coin flips of --judge random / oracle come from one generator
per question. So a question's tree is the same whatever else shares its chunk: with any --questions-per-chunk, any
number of shards, and after a resume (byte for byte on CPU: tests/test_provenance.py; on a GPU, kernels picked by
batch shape may still round a near-tie differently). Under --engine vllm each candidate is one request with that
seed, but vLLM's batching and prefix cache give no such promise for its logits (not tested here).

--mode srlm: the outcome-based baseline the paper compares with (Table 1, "SRLM"; Yuan et al. 2024, "Self-Rewarding
Language Models", §2): --num-candidates whole solutions per question (k; Yuan et al.: 4) sampled at --temperature /
--top-p up to --max-new-tokens; each distinct one scored --srlm-scorings times (Yuan et al.: 3) by the same M_t with
the additive 5-point LLM-as-a-Judge prompt (their Fig. 2: prompts/srlm_judge.txt; the tiny model's compact variant:
srlm_judge_tiny), the scorings sampled like the solutions (seeded per question, solution and scoring) and averaged;
an unparseable scoring (common.parse_score: None) is counted and left out of the mean, a solution with none parsed
gets no score. Its tree has one node whose candidates are the solutions (prefix_steps []), so make_pairs.py makes
the highest- vs the lowest-scored solution a pair with no change (pass --min-gap 0: the scores are means, any gap
counts); no pair when all scored solutions tie (outcome tie) or fewer than two distinct ones were scored.

Reads  --questions JSONL {id, question: str} (other fields, e.g. answer, are carried along and never used)
Writes --out JSONL, one search tree per question:
  {id, question, prompt, solution_steps: [accepted steps], finished, stop_reason, rounds,
   steps: [ {round, step, prefix_steps, candidates: [{text, final, eos, new_tokens}],
             judged, verdicts: [{i, j, order, verdict, raw}], scores, best, worst, tie, unparsed,
             outcome: accepted | single | tie_rollback | empty, rolled_back: bool} ] }
  stop_reason: answer (a step with \\boxed) | eos (ended without \\boxed) | max_steps | empty | too_long
  rolled_back marks an accepted step later discarded by a tie (make_pairs.py drops its pair).
  --mode srlm: the same with mode "srlm", one node (round 1, step 1, prefix_steps []) whose candidates are whole
  solutions, verdicts [], scorings [{i, scoring, score: 0-5 or null, raw, new_tokens}], scores [mean or null],
  outcome accepted | single | tie | unscored (no scoring parsed) | empty; solution_steps: the best solution's steps;
  stop_reason answer | eos | max_tokens (the best solution's end), or the outcome when there is no best.
and next to it <out>.stats.json, <out>.config.json, and <out>.manifest.json (written last: what made the trees; a
rerun skips only when it matches, see common.is_done).

    python generate.py --model runs/default/m1 --questions data/synthetic/questions1.jsonl \\
        --out runs/default/iter1/trees.jsonl --prompt-reasoning reasoning_tiny --prompt-judge judge_tiny \\
        --max-step-tokens 48 --judge-max-new-tokens 64
    python generate.py --mode srlm --model runs/default/m1 --questions data/synthetic/questions1.jsonl \\
        --out runs/srlm/iter1/trees.jsonl --prompt-reasoning reasoning_tiny --prompt-srlm-judge srlm_judge_tiny \\
        --num-candidates 4 --srlm-scorings 3 --max-new-tokens 160 --judge-max-new-tokens 64
    # several GPUs: torchrun --nproc_per_node 2 generate.py ... (each process takes every 2nd question; merged)
"""

import argparse
import time
from collections import Counter

from tqdm import tqdm

from common import (BOXED, DataError, PartialJSONL, add_generation_args, add_judge_args, add_model_args,
                    add_search_args, best_and_worst, chat_prompt, cli, distinct_candidates, first_copies, is_done,
                    load_prompt, merge_shards, output_flags, parse_score, parse_shard, positive_int, prompt_path,
                    read_jsonl, record_ids, save_config, search_stats, shard_path, sidecars, split_steps,
                    stage_manifest, write_json, write_manifest)
from modeling import generate, load_model
from step_search import new_tree, sample_seed, search

# flags of --mode srlm alone: left out of a step search's manifest (they do not change its trees)
SRLM_FLAGS = ("mode", "srlm_scorings", "max_new_tokens", "prompt_srlm_judge")


def srlm_judgment(node):
    """
    SRLM's pairing rule on one node with its scorings: each candidate's score is the mean of its parsed scorings
    (a copy of a judged solution shares its score; None if none parsed); best and worst among the scored judged
    candidates, first index on ties (common.best_and_worst). Sets scores, best, worst, tie, unparsed, outcome.
    """
    parsed = {}
    for s in node["scorings"]:
        if s["score"] is not None:
            parsed.setdefault(s["i"], []).append(s["score"])
    texts = [c["text"] for c in node["candidates"]]
    first = first_copies(texts)
    source = [i if i in node["judged"] else first[t] for i, t in enumerate(texts)]
    scores = [sum(parsed[j]) / len(parsed[j]) if j in parsed else None for j in source]
    scored = [i for i in node["judged"] if scores[i] is not None]
    best = worst = None
    if len(scored) >= 2:
        b, w = best_and_worst([scores[i] for i in scored])
        best, worst = (scored[b], scored[w]) if b is not None else (None, None)
    elif scored:
        best = scored[0]
    tie = len(scored) >= 2 and best is None
    outcome = "tie" if tie else "accepted" if worst is not None else "single" if scored else \
        "unscored" if node["candidates"] else "empty"
    node.update(scores=scores, best=best, worst=worst, tie=tie, outcome=outcome,
                unparsed=sum(s["score"] is None for s in node["scorings"]))


def srlm_search(model, tokenizer, records, ids, args, bar=None):
    """--mode srlm for a chunk of questions: k whole solutions each, scored --srlm-scorings times. Returns trees."""
    reasoning, template = load_prompt(args.prompt_reasoning), load_prompt(args.prompt_srlm_judge)
    k = args.num_candidates
    trees = [dict(new_tree(rid, r, reasoning.format(problem=r["question"])), mode="srlm", finished=True, rounds=1)
             for rid, r in zip(ids, records)]
    outs = generate(model, tokenizer, [chat_prompt(tokenizer, t["prompt"]) for t in trees for _ in range(k)],
                    args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                    seeds=[sample_seed(args.seed, t["id"], "solution", c) for t in trees for c in range(k)])
    nodes, scorings = [], []  # scorings: (question, candidate, scoring) to generate
    for q, t in enumerate(trees):
        candidates = [dict(text=o["text"], final=o["eos"] or BOXED in o["text"], eos=o["eos"],
                           new_tokens=o["new_tokens"]) for o in outs[q * k:(q + 1) * k] if o["text"]]
        texts = [c["text"] for c in candidates]
        judged = list(range(len(texts))) if args.no_dedupe else distinct_candidates(texts)
        nodes.append(dict(round=1, step=1, prefix_steps=[], candidates=candidates, judged=judged, verdicts=[],
                          scorings=[], rolled_back=False))
        scorings += [(q, i, s) for i in judged for s in range(args.srlm_scorings)]
    prompts = [chat_prompt(tokenizer, template.format(question=trees[q]["question"],
                                                      response=nodes[q]["candidates"][i]["text"]))
               for q, i, _ in scorings]
    outs = generate(model, tokenizer, prompts, args.judge_max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, batch_size=args.batch_size,
                    seeds=[sample_seed(args.seed, trees[q]["id"], "score", i, s) for q, i, s in scorings])
    for (q, i, s), o in zip(scorings, outs):
        nodes[q]["scorings"].append(dict(i=i, scoring=s, score=parse_score(o["text"]), raw=o["text"],
                                         new_tokens=o["new_tokens"]))
    for t, node in zip(trees, nodes):
        srlm_judgment(node)
        t["steps"].append(node)
        best = node["candidates"][node["best"]] if node["best"] is not None else None
        t["solution_steps"] = split_steps(best["text"]) if best else []
        t["stop_reason"] = node["outcome"] if best is None else "answer" if BOXED in best["text"] else \
            "eos" if best["eos"] else "max_tokens"
    if bar is not None:
        bar.update(len(trees))
    return trees


def srlm_stats(trees):
    """Counts over --mode srlm trees: solutions, scorings, unparseable ones, the mean score, how nodes ended."""
    nodes = [n for t in trees for n in t["steps"]]
    scores = [s["score"] for n in nodes for s in n["scorings"] if s["score"] is not None]
    outcomes = dict(Counter(n["outcome"] for n in nodes))
    return dict(questions=len(trees), solutions=sum(len(n["candidates"]) for n in nodes),
                scorings=sum(len(n["scorings"]) for n in nodes), unparsed=sum(n["unparsed"] for n in nodes),
                mean_score=sum(scores) / len(scores) if scores else None, outcomes=outcomes)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--questions", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompt-reasoning", default="reasoning", help="paper Fig. 4; the tiny default: reasoning_tiny")
    parser.add_argument("--mode", default="step", choices=["step", "srlm"],
                        help="step: the paper's step search (PSRLM) | srlm: the outcome-based baseline (Yuan et al. "
                             "2024): whole solutions scored 0-5 by the model")
    add_search_args(parser)
    add_judge_args(parser)
    parser.add_argument("--prompt-srlm-judge", default="srlm_judge",
                        help="--mode srlm: Yuan et al. 2024 Fig. 2; the tiny default: srlm_judge_tiny")
    parser.add_argument("--srlm-scorings", type=positive_int, default=3,
                        help="--mode srlm: scorings per solution, averaged (Yuan et al.: 3)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=512, help="--mode srlm: tokens per solution")
    add_generation_args(parser)
    parser.add_argument("--questions-per-chunk", type=positive_int, default=128, help="questions searched together; "
                        "the unit of progress saved for resuming (the trees do not depend on it)")
    parser.add_argument("--limit", type=positive_int, default=None, help="only the first N questions")
    parser.add_argument("--shard", default=None, help="i/n: take every n-th question from the i-th (default: torchrun rank)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    srlm = args.mode == "srlm"
    if srlm and args.judge != "model":
        raise DataError(f"--mode srlm scores with the model itself; --judge {args.judge} is a control of the step "
                        f"search")
    inputs = dict(model=args.model, questions=args.questions, prompt_reasoning=prompt_path(args.prompt_reasoning),
                  prompt_judge=None if srlm else prompt_path(args.prompt_judge),
                  prompt_srlm_judge=prompt_path(args.prompt_srlm_judge) if srlm else None)
    # batch size, prefill chunks and questions per chunk change the speed, not the trees; --engine changes them
    # (vLLM samples from its own random streams) and stays in the manifest; so do the srlm flags in srlm mode
    manifest = stage_manifest("generate", inputs, output_flags(args, "batch_size", "prefill_chunk",
                                                                "questions_per_chunk", *(() if srlm else SRLM_FLAGS)))
    shard, num_shards = parse_shard(args.shard)
    out_path = shard_path(args.out, shard, num_shards)
    if is_done(args.out, manifest, args.overwrite, sidecars(args.out)):
        return
    records = read_jsonl(args.questions, {"question": str})[:args.limit]
    ids = record_ids(records, args.questions)
    if num_shards == 1 or not is_done(out_path, manifest, args.overwrite, sidecars(out_path)):
        progress = PartialJSONL(out_path, manifest)
        todo = [(i, r) for i, r in list(zip(ids, records))[shard::num_shards] if i not in progress.done]
        model, tokenizer = load_model(args.model, load_in_4bit=args.load_in_4bit, attn=args.attn,
                                      prefill_chunk=args.prefill_chunk, engine=args.engine)
        t0 = time.time()
        with tqdm(total=len(todo), desc="search (questions done)") as bar:
            for c in range(0, len(todo), args.questions_per_chunk):
                chunk = todo[c:c + args.questions_per_chunk]
                progress.add((srlm_search if srlm else search)(model, tokenizer, [r for _, r in chunk],
                                                              [i for i, _ in chunk], args, bar))
        progress.finish(ids[shard::num_shards])
        stats = (srlm_stats if srlm else search_stats)(read_jsonl(out_path)) | dict(seconds=round(time.time() - t0, 1))
        print(stats)
        write_json(out_path + ".stats.json", stats)
        save_config(args, out_path + ".config.json")
        write_manifest(out_path, manifest)
    if num_shards > 1 and merge_shards(args.out, num_shards, ids, manifest):
        write_manifest(args.out, manifest)


if __name__ == "__main__":
    cli(main)
