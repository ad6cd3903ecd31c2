"""
Evaluation (paper §4): greedy decoding of each test question with the reasoning prompt, the answer taken from the
LAST \\boxed{...} of the output, graded against the gold answer by math-verify equivalence (deviation: the paper used
Qwen2.5-Math's evaluation code, whose answer normalisation differs in corner cases). Also the step judge's
accuracy on held-out pairs (paper Table 3) and an oracle check of the extraction + grading themselves.

Reads benchmark JSONL in the native fields of each source (format detected from the fields present):
  gsm8k          {question, answer: "... #### 1,234"}           gold = number after ####, commas removed
  math           {problem, solution, ...}                       gold = last \\boxed{} of solution
  math500, aime24, amc23, gaokao2023en, synthetic
                 {problem|question, answer, [solution], [id]}   gold = answer (amc23 floats: 12.0 -> "12")
  olympiadbench  {question, context, final_answer: [str], solution: [str], ...}
  or `hub:NAME[:CONFIG]` through datasets.load_dataset (split "test"; needs hub access).
Writes, per data set, into --out-dir (name: from the file's folder and name, see dataset_name):
  {name}.jsonl           {id, question, output, extracted, gold, correct, num_steps, output_tokens}
  {name}.summary.json    {dataset, n, accuracy, accuracy_se, steps_per_solution, mean_output_tokens, unextracted,
                          model, data, prompt_reasoning, max_new_tokens}
With --search (test-time scaling, paper Table 5): each question is solved by the step search of the loop
(step_search.py: w candidates per step, judged pairwise by the model itself, the best kept; --num-candidates,
--temperature, --top-p, --orders, --max-steps, --max-step-tokens, --seed, --judge as in generate.py), no pair
written, the accepted steps graded like a greedy solution. Writes {name}.search.jsonl (the records above plus
candidate_tokens, judge_tokens: tokens generated for the question's candidates and for its judgments, output_tokens
their sum, rounds, stop_reason) and {name}.search.summary.json (the summary above plus mean_candidate_tokens,
mean_judge_tokens and the search flags). Judge tokens are the judge texts re-tokenized (the EOS after a judgment
is not counted); the random and oracle judges generate none.
With --judge-eval FILE (EFT pairs {id, question, previous_steps: [str], step_a, step_b, label, judgment}, ids unique):
  judge_eval.jsonl       {id, label, verdict, correct, raw}
  judge_eval.summary.json {n, judge_accuracy, judge_accuracy_se, unparsed, unparsed_share, model, data}
and, written last, {name}.jsonl.manifest.json / judge_eval.jsonl.manifest.json: the model, data and prompt (by
content) and the flags that made the results. A finished evaluation is skipped only when they match this run.
With --oracle no model is loaded: each item's gold solution is graded as if it were the model's output (a data set
without a boxed solution gets "... \\boxed{<raw answer field>}"), misgraded items are listed. 100% is the target.

    python evaluate.py --model runs/default/m1 --data data/synthetic/test.jsonl --out-dir runs/default/m1/eval \\
        --prompt-reasoning reasoning_tiny
    python evaluate.py --model runs/default/m1 --judge-eval data/synthetic/eft_test.jsonl \\
        --out-dir runs/default/m1/eval --prompt-judge judge_tiny
    python evaluate.py --search --model runs/default/m1 --data data/synthetic/test.jsonl \\
        --out-dir runs/default/m1/eval --prompt-reasoning reasoning_tiny --prompt-judge judge_tiny --orders 1 \\
        --max-step-tokens 40 --judge-max-new-tokens 64
    python evaluate.py --oracle --data ../shared/data/gsm8k/test.jsonl
    torchrun --nproc_per_node 8 evaluate.py --model M --data ../shared/data/math500/test.jsonl --out-dir M/eval
"""

import argparse
import math
import os
import re
import threading

from common import (DataError, PartialJSONL, add_generation_args, add_judge_args, add_model_args, add_search_args,
                    chat_prompt, cli, is_done, judge_context, last_boxed, load_prompt, made_by, merge_shards,
                    parse_shard, positive_int, prompt_path, read_jsonl, save_config, shard_path, sidecars,
                    split_steps, stage_manifest, write_json, write_manifest)
from modeling import generate, judge_pairs, load_model
from step_search import search

# the flags of --search that change its results (evaluate.py --search's manifest)
SEARCH_FLAGS = ("num_candidates", "temperature", "top_p", "max_steps", "max_step_tokens", "seed", "orders", "judge",
                "no_dedupe", "judge_max_new_tokens", "stop_at_verdict")

# ----------------------------------------------------------------------------------------------------------------
# answers: extraction and equivalence

def strip_dollars(s):
    return re.sub(r"(?<!\\)\$", "", str(s)).strip()


def clean_answer(s):
    """What math-verify trips on: $ delimiters, a trailing period, the whole answer in \\textbf{} (AIME's '(073)')."""
    s = strip_dollars(s).rstrip(".").strip()
    m = re.fullmatch(r"\\(?:textbf|mathbf|mathrm|text)\{(.*)\}", s, re.DOTALL)
    return m.group(1).strip() if m and "{" not in m.group(1) else s


def is_equiv(pred, gold):
    """Is the extracted answer `pred` equal to `gold`? math-verify on both, each wrapped in \\boxed{}, gold first."""
    from math_verify import parse, verify
    pred, gold = clean_answer(pred or ""), clean_answer(gold)
    if not pred or not gold:
        return False
    if re.sub(r"\s", "", pred) == re.sub(r"\s", "", gold):
        return True
    # math-verify's timeouts use signal.alarm, which only the main thread may set: elsewhere run without them
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    parsed = [parse(f"\\boxed{{{s}}}", parsing_timeout=limit) for s in (gold, pred)]
    return verify(*parsed, timeout_seconds=limit)


# ----------------------------------------------------------------------------------------------------------------
# benchmarks in their native fields -> {id, question, gold, solution}

FORMATS = ("gsm8k {question, answer with '#### N'}; math {problem, solution}; math500/aime24/amc23/gaokao2023en/"
           "synthetic {problem or question, answer}; olympiadbench {question, final_answer}")


NATIVE_FIELDS = {"id": (str, int), "unique_id": (str, int), "idx": (str, int), "question": str, "problem": str,
                 "answer": (str, int, float), "solution": (str, list[str]), "final_answer": (str, list[str]),
                 "context": (str, type(None))}
EFT_FIELDS = {"id": (str, int), "question": str, "previous_steps": list[str], "step_a": str, "step_b": str,
              "label": str}


def gold_string(raw):
    """A raw answer field as a gold string: amc23's floats 12.0 -> '12', $...$ dropped."""
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    return strip_dollars(raw)


def with_boxed_answer(solution, raw_answer):
    """The oracle's text: the gold solution if it boxes its answer, else the solution + \\boxed{raw answer}."""
    if last_boxed(solution) is not None:
        return solution
    return f"{solution}\n\nThe final answer is \\boxed{{{raw_answer}}}".lstrip()


def normalize(r, i, where):
    """One native record -> {id, question, gold, solution}."""
    rid = str(next((r[k] for k in ("id", "unique_id", "idx") if r.get(k) is not None), i))
    question = r.get("problem") or r.get("question")
    if question and "final_answer" in r:  # olympiadbench: lists of strings
        answer = ", ".join(r["final_answer"]) if isinstance(r["final_answer"], list) else r["final_answer"]
        solution = r.get("solution") or ""
        solution = solution[0] if isinstance(solution, list) else solution
        question = f"{r['context']}\n{question}" if r.get("context") else question
        return dict(id=rid, question=question, gold=gold_string(answer), solution=with_boxed_answer(solution, answer))
    if question and "answer" in r and "####" in str(r["answer"]):  # gsm8k
        solution, answer = str(r["answer"]).rsplit("####", 1)
        return dict(id=rid, question=question, gold=answer.strip().replace(",", ""),
                    solution=f"{solution.strip()}\n\\boxed{{{answer.strip()}}}")
    if question and "answer" in r:
        solution = r.get("solution") or ""
        return dict(id=rid, question=question, gold=gold_string(r["answer"]),
                    solution=with_boxed_answer(solution, r["answer"]))
    if question and "solution" in r:  # MATH: the answer is the solution's last box
        gold = last_boxed(r["solution"])
        if gold is None:
            raise DataError(f"{where} record {i + 1}: no answer field and no \\boxed{{}} in its solution")
        return dict(id=rid, question=question, gold=gold, solution=r["solution"])
    raise DataError(f"{where} record {i + 1}: unknown format, found fields {sorted(r)}; expected one of: {FORMATS}")


def dataset_name(path):
    """data/gsm8k/test.jsonl -> gsm8k, data/gsm8k/train.jsonl -> gsm8k_train, x/toy.jsonl -> toy, hub:a/b -> b."""
    if path.startswith("hub:"):
        return path[4:].split(":")[0].split("/")[-1]
    stem = os.path.splitext(os.path.basename(path))[0]
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return folder if stem == "test" else f"{folder}_{stem}" if stem in ("train", "dev", "validation") else stem


def load_benchmark(path, name=None):
    """A benchmark file (or hub:NAME[:CONFIG]) -> (name, [{id, question, gold, solution}])."""
    if path.startswith("hub:"):
        import datasets
        hub_name, _, config = path[4:].partition(":")
        try:
            records = list(datasets.load_dataset(hub_name, config or None, split="test"))
        except Exception as e:
            raise DataError(f"cannot load {path} (needs hub access; or pass a local JSONL file): "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    else:  # fields are checked where present; which ones a record needs depends on its format (normalize)
        records = read_jsonl(path, optional=NATIVE_FIELDS)
    if not records:
        raise DataError(f"{path}: no records")
    items = [normalize(r, i, path) for i, r in enumerate(records)]
    if len({it["id"] for it in items}) != len(items):
        raise DataError(f"{path}: ids are not unique")
    return name or dataset_name(path), items


# ----------------------------------------------------------------------------------------------------------------
# evaluation loop: records appended to `<out>.partial` per batch, so a killed run goes on where it stopped


def grade(item, output, output_tokens=None):
    extracted = last_boxed(output)
    return dict(id=item["id"], question=item["question"], output=output, extracted=extracted, gold=item["gold"],
                correct=is_equiv(extracted, item["gold"]), num_steps=len(split_steps(output)),
                output_tokens=output_tokens)


def solve(model, tokenizer, template, items, max_new_tokens, batch_size):
    """Greedy solutions for a batch of items -> [(text, new_tokens)]. The one model call (tests replace it)."""
    prompts = [chat_prompt(tokenizer, template.format(problem=it["question"])) for it in items]
    outs = generate(model, tokenizer, prompts, max_new_tokens, temperature=0.0, batch_size=batch_size)
    return [(o["text"], o["new_tokens"]) for o in outs]


def search_solve(model, tokenizer, items, args):
    """
    The loop's step search on a batch of items, its accepted steps as the solution -> [(text, token counts)]:
    the tokens generated for every candidate of every round, and for every judgment (re-tokenized judge texts).
    """
    trees = search(model, tokenizer, items, [it["id"] for it in items], args)
    out = []
    for tree in trees:
        candidate_tokens = sum(c["new_tokens"] for node in tree["steps"] for c in node["candidates"])
        judge_texts = [v["raw"] for node in tree["steps"] for v in node["verdicts"]] if args.judge == "model" else []
        judge_tokens = sum(len(tokenizer(raw, add_special_tokens=False)["input_ids"]) for raw in judge_texts)
        out.append(("\n".join(tree["solution_steps"]), dict(
            candidate_tokens=candidate_tokens, judge_tokens=judge_tokens, rounds=tree["rounds"],
            stop_reason=tree["stop_reason"])))
    return out


def binomial_se(p, n):
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def summarize(name, records):
    n = len(records)
    acc = sum(r["correct"] for r in records) / n
    tokens = [r["output_tokens"] for r in records if r.get("output_tokens") is not None]
    return dict(dataset=name, n=n, accuracy=acc, accuracy_se=binomial_se(acc, n),
                steps_per_solution=sum(r["num_steps"] for r in records) / n,
                mean_output_tokens=sum(tokens) / len(tokens) if tokens else None,
                unextracted=sum(r["extracted"] is None for r in records))


def to_do(out_path, manifest, args, artifacts=()):
    """
    Asked for every output before the model loads: False if it is finished by this run (skipped); an output of
    another run is an error, or removed under --overwrite (common.is_done). Under sharding this process's shard
    is checked the same way.
    """
    if is_done(out_path, manifest, args.overwrite, [*artifacts, *sidecars(out_path)]):
        return False
    shard, num_shards = parse_shard(args.shard)
    if num_shards > 1:
        path = shard_path(out_path, shard, num_shards)
        is_done(path, manifest, args.overwrite, sidecars(path))  # finished: sharded_run only merges
    return True


def sharded_run(items, out_path, process, args, manifest):
    """
    This process's share (i::n) of the items, through a resumable progress file (`process(batch) -> records`);
    the last shard to finish merges. Returns the records of all items, or None while other shards still run.
    """
    from tqdm import tqdm
    shard, num_shards = parse_shard(args.shard)
    path = shard_path(out_path, shard, num_shards)
    mine = items[shard::num_shards]
    if not made_by(path, manifest):
        partial = PartialJSONL(path, manifest)
        todo = [it for it in mine if it["id"] not in partial.done]
        for b in tqdm(range(0, len(todo), args.batch_size), desc=os.path.basename(path), disable=not todo):
            partial.add(process(todo[b:b + args.batch_size]))
        partial.finish([it["id"] for it in mine])
        if num_shards > 1:
            write_manifest(path, manifest)
    if num_shards == 1:
        return read_jsonl(out_path)
    return read_jsonl(out_path) if merge_shards(out_path, num_shards, [it["id"] for it in items], manifest) else None


def oracle(items, name):
    """Grade each item's gold solution as the output; list what the grader gets wrong."""
    records = [grade(it, it["solution"]) for it in items]
    for r in records:
        if not r["correct"]:
            print(f"  misgraded {name} id={r['id']}: gold={r['gold'][:80]!r} extracted={str(r['extracted'])[:80]!r}")
    return records


def evaluate_judge(model, tokenizer, pairs, out_path, manifest, args):
    """The judge's pairwise accuracy on EFT pairs (paper Table 3); unparsed verdicts count as wrong."""
    template = load_prompt(args.prompt_judge)

    def process(batch):
        items = [(judge_context(p["question"], p["previous_steps"]), p["step_a"], p["step_b"]) for p in batch]
        verdicts = judge_pairs(model, tokenizer, template, items, args.judge_max_new_tokens, args.batch_size,
                               stop_at_verdict=args.stop_at_verdict)
        return [dict(id=p["id"], label=p["label"], verdict=v, correct=v == p["label"], raw=raw)
                for p, (v, raw) in zip(batch, verdicts)]

    records = sharded_run(pairs, out_path, process, args, manifest)
    if records is None:
        return
    n, acc = len(records), sum(r["correct"] for r in records) / len(records)
    unparsed = sum(r["verdict"] is None for r in records)
    summary = dict(n=n, judge_accuracy=acc, judge_accuracy_se=binomial_se(acc, n), unparsed=unparsed,
                   unparsed_share=unparsed / n, model=args.model, data=args.judge_eval)
    write_json(os.path.join(args.out_dir, "judge_eval.summary.json"), summary)
    write_manifest(out_path, manifest)
    print(f"judge: n={n} judge_accuracy: {acc:.4f} ± {summary['judge_accuracy_se']:.4f} unparsed: {unparsed}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser, required=False)
    parser.add_argument("--data", action="append", default=[], help="benchmark JSONL or hub:NAME[:CONFIG]; repeatable")
    parser.add_argument("--out-dir", help="where {name}.jsonl and {name}.summary.json go")
    parser.add_argument("--limit", type=positive_int,
                        help="only the first N items of each data set (and of --judge-eval)")
    add_generation_args(parser)
    parser.add_argument("--max-new-tokens", type=positive_int, default=512, help="tokens per solution")
    parser.add_argument("--prompt-reasoning", default="reasoning",
                        help="prompt name in prompts/ (paper Fig. 4); the tiny default uses reasoning_tiny")
    parser.add_argument("--judge-eval", help="EFT test pairs: report the judge's accuracy on them")
    add_judge_args(parser)
    parser.add_argument("--search", action="store_true",
                        help="test-time scaling (paper Table 5): solve by the loop's step search with the model's own "
                             "judge instead of greedy decoding")
    add_search_args(parser)
    parser.add_argument("--oracle", action="store_true", help="grade the gold solutions themselves; no model")
    parser.add_argument("--shard", help="i/n: this process takes items i::n (default: torchrun's RANK/WORLD_SIZE)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    if not args.oracle and not (args.model and args.out_dir):
        raise DataError("--model and --out-dir are needed (or --oracle to check the grader on gold solutions)")
    if not args.data and not args.judge_eval:
        raise DataError("nothing to evaluate: pass --data FILE and/or --judge-eval FILE")
    if args.oracle and (args.judge_eval or args.search):
        raise DataError("--judge-eval and --search need a model; drop --oracle")
    benchmarks = [load_benchmark(path) for path in args.data]  # bad files fail before the model loads
    first = {}
    for (name, _), path in zip(benchmarks, args.data):
        if name in first:
            raise DataError(f"--data {first[name]} and {path} would both be written as {name}.jsonl; evaluate them "
                            f"into different --out-dir")
        first[name] = path
    if args.oracle:
        for name, items in benchmarks:
            summary = summarize(name, oracle(items[:args.limit], name))
            print(f"{name}: n={summary['n']} accuracy: {summary['accuracy']:.4f} ± {summary['accuracy_se']:.4f}")
        return

    # every output is checked before the model loads: finished by this run -> skipped, by another -> an error
    # --engine too: the two engines' float sums differ, so a near-tie can decode differently (docs/vllm.md)
    model_flags = dict(limit=args.limit, load_in_4bit=args.load_in_4bit, attn=args.attn, engine=args.engine)
    # --search: {name}.search.jsonl, made from the search flags and the judge's prompt as well
    kind = ".search" if args.search else ""
    if args.search:
        stage, prompts = "evaluate search", dict(prompt_judge=prompt_path(args.prompt_judge))
        flags = dict(model_flags, **{k: getattr(args, k) for k in SEARCH_FLAGS})
    else:
        stage, prompts, flags = "evaluate", {}, dict(model_flags, max_new_tokens=args.max_new_tokens)
    todo = []
    for (name, items), path in zip(benchmarks, args.data):
        out_path = os.path.join(args.out_dir, f"{name}{kind}.jsonl")
        manifest = stage_manifest(stage, dict(model=args.model, data=path,
                                              prompt_reasoning=prompt_path(args.prompt_reasoning), **prompts), flags)
        if to_do(out_path, manifest, args, [os.path.join(args.out_dir, f"{name}{kind}.summary.json")]):
            todo.append((name, items[:args.limit], path, out_path, manifest))
    judge = None
    if args.judge_eval:
        pairs = read_jsonl(args.judge_eval, EFT_FIELDS, unique="id")[:args.limit]
        if not pairs:
            raise DataError(f"{args.judge_eval}: no records")
        for p in pairs:
            p["id"] = str(p["id"])
        out_path = os.path.join(args.out_dir, "judge_eval.jsonl")
        manifest = stage_manifest("evaluate judge", dict(model=args.model, judge_eval=args.judge_eval,
                                                         prompt_judge=prompt_path(args.prompt_judge)),
                                  dict(model_flags, judge_max_new_tokens=args.judge_max_new_tokens,
                                       stop_at_verdict=args.stop_at_verdict))
        if to_do(out_path, manifest, args, [os.path.join(args.out_dir, "judge_eval.summary.json")]):
            judge = (pairs, out_path, manifest)
    if not todo and judge is None:
        return
    save_config(args, os.path.join(args.out_dir, "evaluate_config.json"))
    model, tokenizer = load_model(args.model, load_in_4bit=args.load_in_4bit, attn=args.attn,
                                  prefill_chunk=args.prefill_chunk, engine=args.engine)
    template = load_prompt(args.prompt_reasoning)

    summaries = []
    for name, items, path, out_path, manifest in todo:
        def process(batch):
            if args.search:
                return [dict(grade(it, text, counts["candidate_tokens"] + counts["judge_tokens"]), **counts)
                        for it, (text, counts) in zip(batch, search_solve(model, tokenizer, batch, args))]
            outs = solve(model, tokenizer, template, batch, args.max_new_tokens, args.batch_size)
            return [grade(it, text, tokens) for it, (text, tokens) in zip(batch, outs)]

        records = sharded_run(items, out_path, process, args, manifest)
        if records is None:
            continue  # other shards still running; the last one writes the summary
        summary = summarize(name, records)
        summary.update(model=args.model, data=path, prompt_reasoning=args.prompt_reasoning)
        if args.search:
            summary.update(search=True, prompt_judge=args.prompt_judge, **{k: getattr(args, k) for k in SEARCH_FLAGS},
                           **{f"mean_{k}": sum(r[k] for r in records) / len(records)
                              for k in ("candidate_tokens", "judge_tokens")})
        else:
            summary.update(max_new_tokens=args.max_new_tokens)
        write_json(os.path.join(args.out_dir, f"{name}{kind}.summary.json"), summary)
        write_manifest(out_path, manifest)
        print(f"{name}: n={summary['n']} accuracy: {summary['accuracy']:.4f} ± {summary['accuracy_se']:.4f}")
        summaries.append(summary)

    if summaries:
        print(f"\n{'dataset':<16}{'n':>6}{'accuracy':>10}{'± se':>8}{'steps':>7}{'tokens':>8}")
        for s in summaries:
            tokens = f"{s['mean_output_tokens']:.0f}" if s["mean_output_tokens"] is not None else "-"
            print(f"{s['dataset']:<16}{s['n']:>6}{s['accuracy']:>10.4f}{s['accuracy_se']:>8.4f}"
                  f"{s['steps_per_solution']:>7.2f}{tokens:>8}")
    if judge is not None:
        evaluate_judge(model, tokenizer, *judge, args)


if __name__ == "__main__":
    cli(main)
