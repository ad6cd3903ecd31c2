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
import time

from tqdm import tqdm

from common import (PartialJSONL, add_generation_args, add_judge_args, add_model_args, add_search_args, cli, is_done,
                    merge_shards, output_flags, parse_shard, positive_int, prompt_path, read_jsonl, record_ids,
                    save_config, search_stats, shard_path, sidecars, stage_manifest, write_json, write_manifest)
from modeling import load_model
from step_search import search


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--questions", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompt-reasoning", default="reasoning", help="paper Fig. 4; the tiny default: reasoning_tiny")
    add_search_args(parser)
    add_judge_args(parser)
    add_generation_args(parser)
    parser.add_argument("--questions-per-chunk", type=positive_int, default=128, help="questions searched together; "
                        "the unit of progress saved for resuming (the trees do not depend on it)")
    parser.add_argument("--limit", type=positive_int, default=None, help="only the first N questions")
    parser.add_argument("--shard", default=None, help="i/n: take every n-th question from the i-th (default: torchrun rank)")
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
