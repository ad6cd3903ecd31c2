"""
What every stage shares, with no torch (a pure JSON-to-JSON stage such as make_pairs.py imports only this):

- errors: bad input is a one-line message naming file and line (`cli(main)` prints it and exits 2);
- JSONL I/O, atomic writes, and a resumable progress file (`<out>.partial`) so a stage killed halfway goes on where
  it stopped without duplicating records;
- sharding across processes (`--shard i/n` or torchrun) with a deterministic merge;
- prompts (plain text files in prompts/, filled with str.format) and steps (the paper's `Step n: ` format);
- the judge's arithmetic (paper §3.1, Eqs. 1-5): verdict parsing, the comparisons among w candidates, win counts,
  best and worst, and `judge_candidates`, which scores every search step given any verdict function;
- the flags several stages share, each defined once.
The model side (loading, generation, the training loop) is in modeling.py.
"""

import itertools
import json
import os
import re
import sys

# ----------------------------------------------------------------------------------------------------------------
# errors: bad input is a one-line message naming file and line, not a traceback


class DataError(ValueError):
    """Bad input (a malformed JSONL line, a missing field, a wrong flag). Printed without a traceback."""


def cli(main):
    """Run a stage's main(); a DataError ends it with its one-line message and exit code 2."""
    try:
        main()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------------------------
# JSONL


def parse_jsonl_line(line, path, lineno, required=()):
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in required if k not in record]
    if missing:
        raise DataError(f"{path}:{lineno}: missing field(s) {missing}; the line has {sorted(record)}")
    return record


def read_jsonl(path, required=()):
    """All records of a JSONL file; blank lines are skipped; any bad line raises DataError naming file:line."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                records.append(parse_jsonl_line(line, path, lineno, required))
    return records


def write_atomic(path, text):
    """Write text to path through a temp file and a rename, so a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl(path, records):
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def skip_if_done(path, overwrite):
    """A finished stage is not redone: its output exists (written atomically, so it is complete)."""
    if os.path.exists(path) and not overwrite:
        print(f"{path} exists, skipping (pass --overwrite to redo)")
        return True
    return False


def save_config(args, path):
    """The resolved flags, saved next to the output they produced."""
    write_json(path, {k: v for k, v in sorted(vars(args).items())})


class PartialJSONL:
    """
    Progress file `<out>.partial`, appended one complete line per finished record. If the stage is killed, the next
    run reads it back (`done`), skips those records and appends the rest; `finish` writes `<out>` atomically in the
    input order and deletes the progress file. A torn last line (killed mid-write) is cut off, never parsed.
    """

    def __init__(self, out_path, key="id"):
        self.out_path, self.path, self.key = out_path, out_path + ".partial", key
        self.done = {}
        if os.path.exists(self.path):
            with open(self.path, "rb+") as f:
                data = f.read()
                keep = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
                f.truncate(keep)
            for lineno, line in enumerate(data[:keep].decode("utf-8").splitlines(), 1):
                if line.strip():
                    record = parse_jsonl_line(line, self.path, lineno, [key])
                    self.done[record[key]] = record
            print(f"resuming: {len(self.done)} records already in {self.path}")
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")

    def add(self, records):
        for r in records:
            self.done[r[self.key]] = r
            self.file.write(json.dumps(r, ensure_ascii=False) + "\n")
        self.file.flush()

    def finish(self, keys):
        self.file.close()
        write_jsonl(self.out_path, [self.done[k] for k in keys])
        os.remove(self.path)


def record_ids(records, path):
    """Every record gets a stable id: its own `id`/`idx`/`unique_id` if present, else its line index."""
    ids = []
    for i, r in enumerate(records):
        rid = r.get("id", r.get("idx", r.get("unique_id", i)))
        ids.append(str(rid))
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: ids are not unique")
    return ids


# ----------------------------------------------------------------------------------------------------------------
# sharding: `--shard i/n` by hand, or RANK/WORLD_SIZE under torchrun. Shard i takes records i, i+n, i+2n, ...


def parse_shard(spec):
    """'i/n' -> (i, n); None -> this process's rank and world size under torchrun, else (0, 1)."""
    if spec is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    m = re.fullmatch(r"(\d+)/(\d+)", spec)
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise DataError(f"--shard {spec!r}: expected i/n with 0 <= i < n")
    return int(m.group(1)), int(m.group(2))


def shard_path(out_path, shard, num_shards):
    return out_path if num_shards == 1 else f"{out_path}.shard{shard}of{num_shards}"


def merge_shards(out_path, num_shards, keys, key="id"):
    """When every shard file exists, write `out_path` in input order. Returns True if it merged."""
    paths = [shard_path(out_path, i, num_shards) for i in range(num_shards)]
    if num_shards == 1 or not all(os.path.exists(p) for p in paths):
        return False
    by_key = {r[key]: r for p in paths for r in read_jsonl(p, [key])}
    write_jsonl(out_path, [by_key[k] for k in keys])
    print(f"merged {num_shards} shards into {out_path}")
    return True


# ----------------------------------------------------------------------------------------------------------------
# prompts, steps and answers

PROMPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")


def load_prompt(path):
    """A prompt template file; a bare name like 'judge_tiny' means prompts/judge_tiny.txt."""
    if not os.path.exists(path):
        path = os.path.join(PROMPT_DIR, path if path.endswith(".txt") else path + ".txt")
    with open(path, encoding="utf-8") as f:
        return f.read().rstrip("\n")


def chat_prompt(tokenizer, user_text):
    """The model's input up to where its answer starts: the chat template if the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                             add_generation_prompt=True)
    return user_text + "\n"  # base models without a template: plain text, the answer on the next line


# A step starts with "Step n:" at the start of a line (paper Fig. 4: 'Use "Step n: " before each step').
STEP_START = re.compile(r"^[ \t]*Step\s*\d+\s*:", re.MULTILINE)
# Generation of one candidate step stops as soon as the next step's marker begins.
NEXT_STEP = "\nStep"
BOXED = "\\boxed"


def split_steps(solution):
    """A solution text -> its steps, each starting with 'Step n:'; text before the first marker joins step 1."""
    starts = [m.start() for m in STEP_START.finditer(solution)]
    if not starts:
        return [solution.strip()] if solution.strip() else []
    starts[0] = 0
    return [solution[a:b].strip() for a, b in zip(starts, starts[1:] + [len(solution)]) if solution[a:b].strip()]


def join_steps(steps):
    """Steps -> the text the model continues from: each step on its own line, ending with a newline."""
    return "".join(s + "\n" for s in steps)


def cut_at_next_step(text):
    """Generated text -> the single step it starts with (everything from the next step marker on is dropped)."""
    i = text.find(NEXT_STEP, 1)
    return (text if i < 0 else text[:i]).strip()


def judge_context(question, steps):
    """The judge's view of the question and the steps so far (paper Fig. 5: 'Question and Partial Reasoning Steps')."""
    return question.strip() + ("\n" + "\n".join(steps) if steps else "")


BOX = re.compile(r"\\(?:boxed|fbox)\b")


def last_boxed(text):
    """Content of the last \\boxed{...} (or \\fbox{...}, or `\\boxed 5`), nested braces matched; None if none."""
    matches = list(BOX.finditer(text or ""))
    if not matches:
        return None
    i = matches[-1].end()
    if not text[i:].lstrip().startswith("{"):
        m = re.match(r"\s+([^\s$]+)", text[i:])  # `\boxed 5`
        return m.group(1) if m else None
    i = text.index("{", i)
    depth = 0
    for j in range(i, len(text)):
        if text[j - 1] == "\\" and j > i:  # \{ and \} are set braces, not grouping
            continue
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j].strip()
    return None  # cut off inside the box (hit max_new_tokens): no answer


# ----------------------------------------------------------------------------------------------------------------
# the judge's arithmetic (paper §3.1, Eqs. 1-5); the model call that writes verdicts is modeling.judge_pairs

VERDICT = re.compile(r"\[\[([AB])\]\]")


def parse_verdict(text):
    """'[[A]]' -> 'A', '[[B]]' -> 'B'; none, or both letters present -> None (unparseable)."""
    found = set(VERDICT.findall(text))
    return found.pop() if len(found) == 1 else None


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


def judge_candidates(jobs, verdict_fn, orders=2, dedupe=True):
    """
    Score every job's candidates by pairwise wins. jobs: [(question, previous_steps, candidate_texts)];
    verdict_fn([(question, previous_steps, step_a, step_b)]) -> [(verdict or None, raw text)] is called once with
    all comparisons of all jobs (one batched generation for the model judge). Returns per job
      judged (candidate indices compared), verdicts [{i, j, order, verdict, raw}], scores (wins, per candidate),
      best, worst (None if all tie, or worst None if only one distinct candidate), tie, unparsed.
    dedupe (deviation; the paper judges all w candidates): identical candidates are judged once and share a score.
    They carry no preference, and identical texts judged in both orders always tie, which would trigger the
    roll-back on exactly the steps the model is surest of.
    """
    index, comparisons, judged = [], [], []
    for k, (question, previous, candidates) in enumerate(jobs):
        keep = distinct_candidates(candidates) if dedupe else list(range(len(candidates)))
        judged.append(keep)
        for a, b, order in pairs_to_judge(len(keep), orders):
            index.append((k, keep[a], keep[b], order))
            comparisons.append((question, previous, candidates[keep[a]], candidates[keep[b]]))
    results = verdict_fn(comparisons) if comparisons else []
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


def random_verdicts(rng):
    """--judge random, a control (not the method): a coin flip per comparison (does the judge's signal matter?)."""
    return lambda comparisons: [(rng.choice("AB"), "random") for _ in comparisons]


def oracle_verdicts(rng):
    """
    --judge oracle, a control for the synthetic task only: the step that is right by the task's true labels
    (prepare/synthetic.py: step_is_right) wins; two right or two wrong steps get a coin flip, as a judge that must
    answer would. Not the paper's method: the upper bound of any self-judge, which tells a failure of the judge from
    a failure of Step-DPO. Each candidate is checked once, not once per comparison.
    """
    from prepare.synthetic import step_is_right  # the task's labels, imported only by this control
    right = {}

    def is_right(question, previous, step):
        key = (question, len(previous), step)
        if key not in right:
            right[key] = step_is_right(question, len(previous) + 1, step)
        return right[key]

    def verdicts(comparisons):
        out = []
        for question, previous, a, b in comparisons:
            ra, rb = is_right(question, previous, a), is_right(question, previous, b)
            out.append((("A" if ra else "B") if ra != rb else rng.choice("AB"), "oracle"))
        return out
    return verdicts


def order_disagreement(verdict_list):
    """Share of unordered pairs judged in both orders whose two verdicts name different candidates."""
    by_pair = {}
    for v in verdict_list:
        winner = {"A": v["i"], "B": v["j"]}.get(v["verdict"])
        by_pair.setdefault((min(v["i"], v["j"]), max(v["i"], v["j"])), []).append(winner)
    both = [w for w in by_pair.values() if len(w) == 2 and None not in w]
    return sum(w[0] != w[1] for w in both) / len(both) if both else None


def search_stats(trees):
    """Counts over search trees (generate.py): stop reasons, steps per solution, roll-backs, unparsed verdicts."""
    nodes = [n for t in trees for n in t["steps"]]
    # candidate indices restart at every step: key each comparison by (step, candidate)
    verdicts = [dict(v, i=(k, v["i"]), j=(k, v["j"])) for k, n in enumerate(nodes) for v in n["verdicts"]]
    stop = {}
    for t in trees:
        stop[t["stop_reason"]] = stop.get(t["stop_reason"], 0) + 1
    return dict(questions=len(trees), stop_reasons=stop,
                steps_per_solution=sum(len(t["solution_steps"]) for t in trees) / max(1, len(trees)),
                rounds=sum(t["rounds"] for t in trees), tie_rollbacks=sum(n["outcome"] == "tie_rollback" for n in nodes),
                verdicts=len(verdicts), unparsed=sum(v["verdict"] is None for v in verdicts),
                order_disagreement=order_disagreement(verdicts))


# ----------------------------------------------------------------------------------------------------------------
# flags several stages share, each defined once (one name and one default per setting)


def add_model_args(parser, required=True):
    """The model a stage loads: M_t as a directory (full weights or a LoRA adapter naming its base) or a hub name."""
    parser.add_argument("--model", required=required, help="model directory (or LoRA adapter directory) or hub name")
    parser.add_argument("--load-in-4bit", action="store_true", help="QLoRA: NF4 base weights (CUDA + bitsandbytes)")
    parser.add_argument("--attn", default="sdpa", help="sdpa | flash_attention_2 (CUDA + flash-attn) | eager")


def add_generation_args(parser):
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                        help="hf: plain HF generate (the reference); vllm: the same generation through vLLM "
                             "(vllm_engine.py; pip install -r requirements-vllm.txt; docs/vllm.md)")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per generate call (hf)")
    parser.add_argument("--prefill-chunk", type=int, default=0,
                        help="prompt tokens per prefill forward (0: all at once); caps the prefill's activations, "
                             "the memory peak of large batches (docs/gpu.md)")


def add_judge_args(parser, search=True):
    """The step judge (paper §3.1, Fig. 5); search=True adds how the search uses it (the re-judge CLI too)."""
    parser.add_argument("--prompt-judge", default="judge", help="paper Fig. 5; the tiny default: judge_tiny")
    parser.add_argument("--judge-max-new-tokens", type=int, default=512, help="the judge's explanation + verdict")
    parser.add_argument("--stop-at-verdict", action="store_true",
                        help="stop the judge right after its first [[A]]/[[B]] (a cost lever; the paper's judge "
                             "writes on; docs/vllm.md measures it)")
    if not search:
        return
    parser.add_argument("--orders", type=int, default=2, choices=[1, 2],
                        help="judge both (A,B) and (B,A) (not stated in the paper; 2 cancels position bias)")
    parser.add_argument("--judge", default="model", choices=["model", "random", "oracle"],
                        help="controls, not the method: random = coin-flip verdicts (does the judge's signal "
                        "matter?); oracle = true step labels of the synthetic task (does Step-DPO work with a "
                        "perfect judge?)")
    parser.add_argument("--no-dedupe", action="store_true", help="judge identical candidates too (paper)")


def add_training_args(parser):
    """Flags of both trainers: full fine-tuning by default, (Q)LoRA for large models, DDP under torchrun."""
    add_model_args(parser)
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights")
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA r")
    parser.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (scale = alpha / r)")
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="0 by default so policy and reference agree exactly at step 0 (DPO loss = log 2)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--optim", default="adamw", help="adamw | paged_adamw_8bit (bitsandbytes, CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
