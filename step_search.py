"""
The step-by-step search with self-judging (paper §3.3), shared by the stage that learns from it (generate.py: every
step's candidates, verdicts and (best, worst) go to the preference pairs) and the stage that only uses it at test time
(evaluate.py --search: the accepted steps are the answer, graded like a greedy solution; paper Table 5).

For every question, at each step: sample w candidate next steps from M_t (T=0.5, top_p=0.95), stopping each at the
next "Step" marker or EOS; the same M_t judges every pair of candidates with the pairwise judge prompt (paper Fig. 5);
score = number of wins (Eqs. 1-5); the best candidate is appended and the search goes on. If all candidates tie, the
previous step is dropped and the search rolls back one step. A candidate that holds \\boxed{} or ends with EOS ends
the solution. All unfinished questions of a chunk advance together: one batched generate call for the candidates,
one for all their judgments, per step. "At most 20 steps" (paper: "max iteration number = 20") is counted in search
rounds, roll-backs included, so a search that keeps tying still ends.

Every random draw is seeded by its question: candidate c of round r of question q samples from a generator seeded
by (--seed, q, r, c) (modeling.SeededGumbel), and the coin flips of --judge random / oracle come from one generator
per question. So a question's tree is the same whatever else shares its chunk: with any chunk size, any number of
shards, after a resume, and in generate.py and evaluate.py --search alike.
"""

import random
import zlib

from common import BOXED, chat_prompt, join_steps, judge_candidates, load_prompt
from modeling import generate, verdict_fn


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


def sample_seed(*parts):
    """The sampling seed of one generated text from what names it (seed, question id, round, index, ...), never
    from its chunk or shard."""
    return zlib.crc32("-".join(map(str, parts)).encode())


def candidate_seed(seed, question_id, search_round, candidate):
    """The sampling seed of one candidate step: its question, search round and index."""
    return sample_seed(seed, question_id, search_round, candidate)


def search(model, tokenizer, records, ids, args, bar=None):
    """
    Run the step search for a chunk of questions, all advancing together. Returns their trees (generate.py's
    schema). Uses args: prompt_reasoning, prompt_judge, num_candidates, temperature, top_p, max_steps,
    max_step_tokens, batch_size, judge, orders, no_dedupe, seed, judge_max_new_tokens, stop_at_verdict.
    """
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
        if bar is not None:
            bar.update(sum(t["finished"] for t in active))
