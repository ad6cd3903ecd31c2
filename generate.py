"""
Step-by-step search with self-judging (paper §3.3): M_t builds its own step-level preferences, with no labels.

For every question, at each step: sample w candidate next steps from M_t (T=0.5, top_p=0.95), stopping each at the
next "Step" marker or EOS; the same M_t judges every pair of candidates with the pairwise judge prompt (judge.py);
score = number of wins (Eqs. 1-5); the best candidate is appended and the search goes on; (best, worst) is the
step's preference pair. If all candidates tie, the previous step and its pair are dropped and the search rolls back
one step. A candidate that holds \\boxed{} or ends with EOS ends the solution. All unfinished questions of a chunk
advance together: one batched generate call for the candidates, one for all their judgments, per step.

Every random draw is seeded by its question: candidate c of round r of question q samples from a generator seeded
by (--seed, q, r, c) (modeling.SeededGumbel), and the coin flips of --judge random / oracle come from one generator
per question. So a question's tree is the same whatever else shares its chunk: with any --questions-per-chunk, any
number of shards, and after a resume (byte for byte on CPU: tests/test_provenance.py; on a GPU, kernels picked by
batch shape may still round a near-tie differently). Under --engine vllm each candidate is one request with that
seed, but vLLM's batching and prefix cache give no such promise for its logits (not tested here).

"At most 20 steps" (paper: "max iteration number = 20") is counted in search rounds, roll-backs included, so a
search that keeps tying still ends.

Reads  --questions JSONL {id, question: str} (other fields, e.g. answer, are carried along and never used)
Writes --out JSONL, one search tree per question:
  {id, question, prompt, solution_steps: [accepted steps], finished, stop_reason, rounds,
   steps: [ {round, step, prefix_steps, candidates: [{text, final, eos, new_tokens}],
             judged, verdicts: [{i, j, order, verdict, raw}], scores, best, worst, tie, unparsed,
             outcome: accepted | single | tie_rollback | empty, rolled_back: bool} ] }
  stop_reason: answer (a step with \\boxed) | eos (ended without \\boxed) | max_steps | empty | too_long
  rolled_back marks an accepted step later discarded by a tie (make_pairs.py drops its pair).
and next to it <out>.stats.json, <out>.config.json, and <out>.manifest.json (written last: what made the trees; a
rerun skips only when it matches, see common.is_done).

    python generate.py --model runs/default/m1 --questions data/synthetic/questions1.jsonl \\
        --out runs/default/iter1/trees.jsonl --prompt-reasoning reasoning_tiny --prompt-judge judge_tiny \\
        --max-step-tokens 48 --judge-max-new-tokens 64
    # several GPUs: torchrun --nproc_per_node 2 generate.py ... (each process takes every 2nd question; merged)
"""

import argparse
import random
import time
import zlib

from tqdm import tqdm

from common import (BOXED, PartialJSONL, add_generation_args, add_judge_args, add_model_args, chat_prompt, checked,
                    cli, is_done, join_steps, judge_candidates, load_prompt, merge_shards, nonnegative_float,
                    output_flags, parse_shard, positive_int, probability, prompt_path, read_jsonl, record_ids,
                    save_config, search_stats, shard_path, sidecars, stage_manifest, write_json, write_manifest)
from modeling import generate, load_model, verdict_fn


def new_tree(rid, record, prompt):
    return dict(id=rid, question=record["question"], prompt=prompt, solution_steps=[], finished=False,
                stop_reason=None, rounds=0, steps=[])


def apply_judgment(tree, node, max_steps):
    """The search rules of §3.3 for one question after its step was judged: accept, roll back, or stop."""
    tree["rounds"] += 1
    if node["best"] is None and not node["tie"]:
        node["outcome"], tree["finished"], tree["stop_reason"] = "empty", True, "empty"
        return
    if node["tie"]:
        node["outcome"] = "tie_rollback"
        if tree["solution_steps"]:  # drop the previous step and its pair; at step 1 there is nothing to drop
            tree["solution_steps"].pop()
            accepted = [n for n in tree["steps"] if n["outcome"] in ("accepted", "single") and not n["rolled_back"]]
            accepted[-1]["rolled_back"] = True
    else:
        node["outcome"] = "accepted" if node["worst"] is not None else "single"
        best = node["candidates"][node["best"]]
        tree["solution_steps"].append(best["text"])
        if best["final"]:
            tree["finished"], tree["stop_reason"] = True, "answer" if BOXED in best["text"] else "eos"
            return
    if tree["rounds"] >= max_steps:
        tree["finished"], tree["stop_reason"] = True, "max_steps"


def candidate_seed(seed, question_id, search_round, candidate):
    """The sampling seed of one candidate step: its question, search round and index, never its chunk or shard."""
    return zlib.crc32(f"{seed}-{question_id}-{search_round}-{candidate}".encode())


def search(model, tokenizer, records, ids, args, bar):
    """Run the step search for a chunk of questions, all advancing together. Returns their trees."""
    reasoning = load_prompt(args.prompt_reasoning)
    judge_template = load_prompt(args.prompt_judge)
    coins = {rid: random.Random(f"{args.seed}-{rid}") for rid in ids}  # --judge random / oracle: one per question
    max_len = getattr(model.config, "max_position_embeddings", 1 << 30)
    trees = [new_tree(rid, r, reasoning.format(problem=r["question"])) for rid, r in zip(ids, records)]
    while True:
        active = [t for t in trees if not t["finished"]]
        if not active:
            return trees
        prompts = []
        for t in active:
            text = chat_prompt(tokenizer, t["prompt"]) + join_steps(t["solution_steps"])
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) + args.max_step_tokens > max_len:
                t["finished"], t["stop_reason"] = True, "too_long"
            prompts.append(text)
        keep = [k for k, t in enumerate(active) if not t["finished"]]
        active, prompts = [active[k] for k in keep], [prompts[k] for k in keep]
        # w candidates per question: the prompt repeated w times, sampled independently
        outs = generate(model, tokenizer, [p for p in prompts for _ in range(args.num_candidates)],
                        args.max_step_tokens, temperature=args.temperature, top_p=args.top_p,
                        batch_size=args.batch_size, one_step=True,
                        seeds=[candidate_seed(args.seed, t["id"], t["rounds"] + 1, c)
                               for t in active for c in range(args.num_candidates)])
        nodes = []
        for k, t in enumerate(active):
            cands = [dict(text=o["text"], final=o["eos"] or BOXED in o["text"], eos=o["eos"],
                          new_tokens=o["new_tokens"])
                     for o in outs[k * args.num_candidates:(k + 1) * args.num_candidates] if o["text"]]
            nodes.append(dict(round=t["rounds"] + 1, step=len(t["solution_steps"]) + 1,
                              prefix_steps=list(t["solution_steps"]), candidates=cands, rolled_back=False))
        jobs = [(t["question"], n["prefix_steps"], [c["text"] for c in n["candidates"]]) for t, n in zip(active, nodes)]
        if args.judge == "model":  # every question's comparisons in one batched generation (greedy)
            judgments = judge_candidates(jobs, verdict_fn(args, model, tokenizer, judge_template), args.orders,
                                         not args.no_dedupe)
        else:  # a control: each question's coin flips from its own generator
            judgments = [judge_candidates([job], verdict_fn(args, None, None, None, coins[t["id"]]), args.orders,
                                          not args.no_dedupe)[0] for job, t in zip(jobs, active)]
        for t, node, judgment in zip(active, nodes, judgments):
            node.update(judgment)
            t["steps"].append(node)
            apply_judgment(t, node, args.max_steps)
        bar.update(sum(t["finished"] for t in active))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--questions", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompt-reasoning", default="reasoning", help="paper Fig. 4; the tiny default: reasoning_tiny")
    parser.add_argument("--num-candidates", type=checked(int, lambda v: v >= 2, "an integer >= 2 (a pair to judge)"),
                        default=6, help="w, paper §4")
    parser.add_argument("--temperature", type=nonnegative_float, default=0.5, help="paper §4")
    parser.add_argument("--top-p", type=probability, default=0.95, help="paper §4")
    parser.add_argument("--max-steps", type=positive_int, default=20,
                        help="paper: max iteration number 20 (search rounds)")
    parser.add_argument("--max-step-tokens", type=positive_int, default=256, help="new tokens per candidate step")
    add_judge_args(parser)
    add_generation_args(parser)
    parser.add_argument("--questions-per-chunk", type=positive_int, default=128, help="questions searched together; "
                        "the unit of progress saved for resuming (the trees do not depend on it)")
    parser.add_argument("--limit", type=positive_int, default=None, help="only the first N questions")
    parser.add_argument("--shard", default=None, help="i/n: take every n-th question from the i-th (default: torchrun rank)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    inputs = dict(model=args.model, questions=args.questions, prompt_reasoning=prompt_path(args.prompt_reasoning),
                  prompt_judge=prompt_path(args.prompt_judge))
    # batch size, prefill chunks and questions per chunk change the speed, not the trees; --engine changes them
    # (vLLM samples from its own random streams) and stays in the manifest
    manifest = stage_manifest("generate", inputs, output_flags(args, "batch_size", "prefill_chunk",
                                                                "questions_per_chunk"))
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
                progress.add(search(model, tokenizer, [r for _, r in chunk], [i for i, _ in chunk], args, bar))
        progress.finish(ids[shard::num_shards])
        stats = search_stats(read_jsonl(out_path)) | dict(seconds=round(time.time() - t0, 1))
        print(stats)
        write_json(out_path + ".stats.json", stats)
        save_config(args, out_path + ".config.json")
        write_manifest(out_path, manifest)
    if num_shards > 1 and merge_shards(args.out, num_shards, ids, manifest):
        write_manifest(args.out, manifest)


if __name__ == "__main__":
    cli(main)
