"""
What every stage shares, with no torch (a pure JSON-to-JSON stage such as make_pairs.py imports only this):

- errors: bad input is a one-line message naming file and line (`cli(main)` prints it and exits 2);
- JSONL I/O with every field checked by type where it is read, atomic writes, and a resumable progress file
  (`<out>.partial`) so a stage killed halfway goes on where it stopped without duplicating records;
- provenance: each output gets a manifest of what produced it (inputs by content, the flags, the model), written
  last, so a finished stage is skipped only when nothing it depends on changed, and a stale output never passes
  as a fresh one;
- argument types that reject a bad flag before any model loads;
- sharding across processes (`--shard i/n` or torchrun) with a deterministic merge;
- prompts (plain text files in prompts/, filled with str.format) and steps (the paper's `Step n: ` format);
- the judge's arithmetic (paper §3.1, Eqs. 1-5): verdict parsing, the comparisons among w candidates, win counts,
  best and worst, and `judge_candidates`, which scores every search step given any verdict function;
- the flags several stages share, each defined once.
The model side (loading, generation, the training loop) is in modeling.py.
"""

import argparse
import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import tempfile

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
# JSONL: every record checked where it is read, field by field, so bad data fails at its line before any model loads


def type_name(kind):
    """str -> 'str', list[str] -> 'list[str]', (str, int) -> 'str or int'."""
    if isinstance(kind, tuple):
        return " or ".join(type_name(k) for k in kind)
    return str(kind) if hasattr(kind, "__origin__") else "null" if kind is type(None) else kind.__name__


def has_type(value, kind):
    """isinstance for a field spec: a type, a tuple of them, or list[T]; a bool is not a number; an int is a float."""
    if isinstance(kind, tuple):
        return any(has_type(value, k) for k in kind)
    if hasattr(kind, "__origin__"):  # list[str]
        return isinstance(value, kind.__origin__) and all(has_type(v, kind.__args__[0]) for v in value)
    if kind in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def parse_jsonl_line(line, path, lineno, required=(), optional=None):
    """
    One JSONL line -> its record. required: field names, or {field: type} to check their types too (a type, a tuple
    of types, or list[str]); optional: {field: type} checked only where the field is present.
    """
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in required if k not in record]
    if missing:
        raise DataError(f"{path}:{lineno}: missing field(s) {missing}; the line has {sorted(record)}")
    spec = dict(required) if isinstance(required, dict) else {}
    spec.update({k: t for k, t in (optional or {}).items() if k in record})
    for field, kind in spec.items():
        if not has_type(record[field], kind):
            value = json.dumps(record[field], ensure_ascii=False)
            raise DataError(f"{path}:{lineno}: field {field!r} must be {type_name(kind)}, got "
                            f"{type(record[field]).__name__} {value[:60]}")
    return record


def read_jsonl(path, required=(), optional=None, unique=None):
    """
    All records of a JSONL file, each checked by parse_jsonl_line (required/optional fields and their types); blank
    lines are skipped; with unique="id", two records with the same id are an error. Any bad line raises DataError
    naming file:line (also bytes that are not UTF-8).
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    records, first_line = [], {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                f"{e.start + 1})") from None
            if not line.strip():
                continue
            record = parse_jsonl_line(line, path, lineno, required, optional)
            if unique is not None:
                key = str(record.get(unique))
                if key in first_line:
                    raise DataError(f"{path}:{lineno}: duplicate {unique} {key!r} (first at line {first_line[key]})")
                first_line[key] = lineno
            records.append(record)
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


def save_config(args, path):
    """The resolved flags, saved next to the output they produced."""
    write_json(path, {k: v for k, v in sorted(vars(args).items())})


# ----------------------------------------------------------------------------------------------------------------
# provenance: every output has a manifest of what produced it -- the stage, its inputs by content, the flags that
# change it -- written last and atomically (`<out>.manifest.json`; `manifest.json` inside a model directory).
# A finished stage is skipped only when its manifest matches this run; otherwise the run stops with what changed,
# or redoes the stage under --overwrite. Progress files and shards carry the manifest too and are only resumed or
# merged when it matches, so nothing of another run (another model, other flags, other data) is ever mixed in.

HASH_LIMIT = 256 << 20  # files up to 256 MiB are known by their content (sha256), larger ones by size and mtime
MANIFEST = "manifest.json"
NOT_OUTPUT_FLAGS = ("out", "out_dir", "overwrite", "shard")  # where an output goes and whether to redo it
# Flags added to a stage later, each with the value at which the stage writes what it wrote before the flag: at that
# value a flag is left out of the manifest, so outputs made before it still count as made by the same flags
LATER_FLAGS = {"eft_operand_first": 0.0, "sentence_labels": False, "noisy_facts": 0.0,  # prepare/synthetic.py
               "noisy_fact_rate": 0.6,
               "steps": None,  # train_step_dpo.py
               "digit_space": "own"}  # prepare/tiny_model.py


def file_fingerprint(path):
    st = os.stat(path)
    if st.st_size > HASH_LIMIT:  # a multi-GB weight file: hashing it at every stage start would cost minutes
        return dict(size=st.st_size, mtime_ns=st.st_mtime_ns)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return dict(sha256=digest.hexdigest())


def dir_files(folder):
    """{relative path: fingerprint} of every file in a folder but its manifest."""
    files = {}
    for root, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            path = os.path.join(root, name)
            if path != os.path.join(folder, MANIFEST):
                files[os.path.relpath(path, folder)] = file_fingerprint(path)
    return files


def fingerprint(path):
    """
    An input as it is now. A file: its content (size + mtime above HASH_LIMIT). A directory (a model): its own
    manifest if a stage wrote one (it fingerprints the model's files), else all its files. Anything else (a hub
    model name): the name. A list: each.
    """
    if isinstance(path, list):
        return [fingerprint(p) for p in path]
    if os.path.isfile(path):
        return file_fingerprint(path)
    if os.path.isdir(path):
        own = os.path.join(path, MANIFEST)
        if os.path.isfile(own):
            return dict(manifest=file_fingerprint(own))
        return dict(files=hashlib.sha256(json.dumps(dir_files(path), sort_keys=True).encode()).hexdigest())
    return dict(name=path)


def output_flags(args, *ignore):
    """A stage's flags but `ignore` (those that change only speed or memory); stage_manifest drops the rest."""
    return {k: v for k, v in vars(args).items() if k not in ignore}


def stage_manifest(stage, inputs, flags):
    """
    What produces an output: the stage, its inputs {flag: path or [paths]} by fingerprint (the path is kept for the
    message, not compared), and the flags {flag: value} that change the output (an input's flag is its input).
    """
    manifest = dict(stage=stage,
                    inputs={k: dict(path=p, fingerprint=fingerprint(p)) for k, p in inputs.items() if p is not None},
                    flags={k: v for k, v in sorted(flags.items()) if k not in inputs and k not in NOT_OUTPUT_FLAGS
                           and not (k in LATER_FLAGS and v == LATER_FLAGS[k])})
    return json.loads(json.dumps(manifest))  # as it will read back (tuples become lists)


def manifest_path(out):
    return os.path.join(out, MANIFEST) if os.path.isdir(out) else out + ".manifest.json"


def read_manifest(out):
    """The manifest an output was made with; None if it has none (or it cannot be read)."""
    try:
        with open(manifest_path(out), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_manifest(out, manifest):
    """Written last, once everything else of the output is in place: only now does the output count as finished."""
    write_json(manifest_path(out), manifest)


def flag_name(key):
    return "--" + key.replace("_", "-")


def manifest_changes(old, new):
    """What differs between the manifest an output was made with and this run's, in words; [] if nothing does."""
    if old is None:
        return ["it has no manifest (made by an older version, or its stage was killed)"]
    if old.get("stage") != new["stage"]:
        return [f"it was made by {old.get('stage')}, not {new['stage']}"]
    changes = []
    old_inputs = old.get("inputs", {})
    for k in sorted(set(old_inputs) | set(new["inputs"])):
        was, now = old_inputs.get(k, {}), new["inputs"].get(k, {})
        if was.get("fingerprint") != now.get("fingerprint"):
            where = f"{was.get('path')} -> {now.get('path')}" if was.get("path") != now.get("path") else \
                f"{now.get('path')} has new content"
            changes.append(f"{flag_name(k)} changed ({where})")
    old_flags = old.get("flags", {})
    for k in sorted(set(old_flags) | set(new["flags"])):
        if k not in old_flags or k not in new["flags"] or old_flags[k] != new["flags"][k]:
            changes.append(f"{flag_name(k)} {old_flags.get(k, '(unset)')} -> {new['flags'].get(k, '(unset)')}")
    return changes


def made_by(out, manifest):
    """Is `out` finished, by a run with this manifest?"""
    return os.path.lexists(out) and not manifest_changes(read_manifest(out), manifest)


def remove(*paths):
    """Delete files and folders that may or may not be there (a link is unlinked, never followed)."""
    for path in paths:
        if os.path.islink(path) or os.path.isfile(path):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        elif os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)


def sidecars(path):
    """The files a stage keeps next to an output: its progress file, stats and config."""
    return [path + ".partial", path + ".stats.json", path + ".config.json"]


def check_writable(out):
    """Fail now, not after hours of work, if the folder that will hold `out` cannot be written."""
    folder = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write_check.tmp")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise DataError(f"{out}: cannot write there ({e.strerror}: {e.filename or folder})") from None


def is_done(out, manifest, overwrite, artifacts=()):
    """
    Asked before a stage does anything (loads a model, reads its data). True if `out` is finished and was made by
    this run's manifest: the stage is skipped. An `out` made by another run (other inputs or flags, or no manifest)
    is an error saying what changed; under --overwrite it is removed instead, with its manifest and `artifacts`
    (progress files, shards, reference log-probs, stats, configs), and the stage redoes it. Also refuses an `out`
    that is one of the stage's inputs and checks that it can be written.
    """
    stage = manifest["stage"]
    for k, given in manifest["inputs"].items():
        paths = given["path"] if isinstance(given["path"], list) else [given["path"]]
        if any(os.path.realpath(p) == os.path.realpath(out) for p in paths):
            raise DataError(f"{stage}: the output {out} is also its input {flag_name(k)}; write it elsewhere")
    if os.path.lexists(out) and not overwrite:
        changes = manifest_changes(read_manifest(out), manifest)
        if not changes:
            print(f"{out} exists, skipping: made by the same inputs and flags (pass --overwrite to redo)")
            return True
        raise DataError(f"{stage}: {out} was made by another run: {'; '.join(changes)}. Pass --overwrite to redo it "
                        f"(or write elsewhere)")
    if overwrite:
        remove(out, out + ".manifest.json", *artifacts)  # a folder's manifest goes with it (a link: not followed)
    check_writable(out)
    return False


class PartialJSONL:
    """
    Progress file `<out>.partial`: a first line with the run's manifest, then one complete line per finished record.
    If the stage is killed, the next run reads it back (`done`), skips those records and appends the rest -- only if
    the manifest matches, else it stops saying what changed (--overwrite removes the file before). `finish` writes
    `<out>` atomically in the input order and deletes the progress file. A torn last line (killed mid-write) is cut
    off, never parsed. The file is locked while open: a second process on the same output stops with an error
    instead of interleaving its records.
    """

    def __init__(self, out_path, manifest, key="id"):
        self.out_path, self.path, self.key = out_path, out_path + ".partial", key
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.file = open(self.path, "a+b")
        try:
            self.done = self._read_back(manifest)
        except BaseException:
            self.file.close()
            raise

    def _read_back(self, manifest):
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DataError(f"{self.path}: another process is writing this output (it holds the file's lock); "
                            f"wait for it to end or stop it") from None
        self.file.seek(0)
        data = self.file.read()
        keep = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
        self.file.truncate(keep)
        lines = data[:keep].decode("utf-8").splitlines()
        if not lines:
            self.file.write((json.dumps(dict(manifest=manifest), ensure_ascii=False) + "\n").encode("utf-8"))
            self.file.flush()
            return {}
        header = parse_jsonl_line(lines[0], self.path, 1)
        changes = manifest_changes(header.get("manifest"), manifest)
        if changes:
            raise DataError(f"{manifest['stage']}: {self.path} holds the progress of another run: {'; '.join(changes)}"
                            f". Pass --overwrite to start over")
        done = {}
        for lineno, line in enumerate(lines[1:], 2):
            if line.strip():
                record = parse_jsonl_line(line, self.path, lineno, [self.key])
                done[record[self.key]] = record
        print(f"resuming: {len(done)} records already in {self.path}")
        return done

    def add(self, records):
        for r in records:
            self.done[r[self.key]] = r
            self.file.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
        self.file.flush()

    def finish(self, keys):
        write_jsonl(self.out_path, [self.done[k] for k in keys])
        os.remove(self.path)
        self.file.close()  # the lock is held until the output is in place


def record_ids(records, path):
    """Every record gets a stable id: its own `id`/`idx`/`unique_id` if present, else its line index."""
    ids, first = [], {}
    for i, r in enumerate(records):
        rid = str(r.get("id", r.get("idx", r.get("unique_id", i))))
        if rid in first:
            raise DataError(f"{path}: records {first[rid] + 1} and {i + 1} have the same id {rid!r}")
        first[rid] = i
        ids.append(rid)
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


def merge_shards(out_path, num_shards, keys, manifest, key="id"):
    """
    When every shard is finished by a run with this manifest, write `out_path` in input order (the caller writes
    its manifest, last). A shard of another run is never merged: it waits for its own process to redo it.
    Returns True if it merged.
    """
    paths = [shard_path(out_path, i, num_shards) for i in range(num_shards)]
    waiting = [p for p in paths if not made_by(p, manifest)]
    if waiting:
        print(f"not merged yet: {', '.join(waiting)} not finished by this run (the last shard to finish merges)")
        return False
    by_key = {r[key]: r for p in paths for r in read_jsonl(p, [key])}
    write_jsonl(out_path, [by_key[k] for k in keys])
    print(f"merged {num_shards} shards into {out_path}")
    return True


# ----------------------------------------------------------------------------------------------------------------
# prompts, steps and answers

PROMPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")


def prompt_path(name):
    """
    The file of a prompt name: 'judge_tiny' (or 'judge_tiny.txt') -> prompts/judge_tiny.txt. Only files in prompts/:
    a name that resolves anywhere else ('../x', an absolute path, a link out) or does not exist is a DataError,
    raised where the flags are read, before any model loads.
    """
    folder = os.path.realpath(PROMPT_DIR)
    path = os.path.realpath(os.path.join(folder, name if name.endswith(".txt") else name + ".txt"))
    if os.path.dirname(path) != folder or not os.path.isfile(path):
        names = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".txt"))
        raise DataError(f"prompt {name!r}: not a prompt in prompts/ (there: {', '.join(names)})")
    return path


def load_prompt(name):
    """A prompt template from prompts/ (see prompt_path)."""
    with open(prompt_path(name), encoding="utf-8") as f:
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


# The outcome-based judge of the SRLM baseline (Yuan et al. 2024, "Self-Rewarding Language Models", Fig. 2): an
# additive 5-point score of a whole solution, written last as "Score: <total points>".
SCORE = re.compile(r"Score:[ \t]*([^\n]*)")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_score(text):
    """
    'Score: 4' -> 4. None (unparseable, counted by the caller) when there is no 'Score:', when the rest of its line
    holds no number or several ('Score: 4/5'), when the number is not a whole one in 0..5, or when two 'Score:'
    lines disagree (the same score repeated counts once, as a repeated verdict does in parse_verdict).
    """
    values = set()
    for rest in SCORE.findall(text):
        numbers = NUMBER.findall(rest)
        if len(numbers) != 1:
            return None
        values.add(float(numbers[0]))
    if len(values) != 1:
        return None
    value = values.pop()
    return int(value) if value.is_integer() and 0 <= value <= 5 else None


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


def first_copies(texts):
    """{text: index of its first occurrence}: the copy that is judged (or scored) for all its copies."""
    first = {}
    for i, t in enumerate(texts):
        first.setdefault(t, i)
    return first


def distinct_candidates(texts):
    """Indices of the first occurrence of each distinct candidate text."""
    return sorted(first_copies(texts).values())


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
        rep = first_copies(candidates) if dedupe else None
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
    """
    Counts over search trees (generate.py): stop reasons, steps per solution, roll-backs, candidates that ended with
    an EOS the model emitted / ended the solution, verdicts by kind ([[A]], [[B]], unparsed: position bias shows as
    a lopsided A/B split) and the order disagreement.
    """
    nodes = [n for t in trees for n in t["steps"]]
    # candidate indices restart at every step: key each comparison by (step, candidate)
    verdicts = [dict(v, i=(k, v["i"]), j=(k, v["j"])) for k, n in enumerate(nodes) for v in n["verdicts"]]
    stop = {}
    for t in trees:
        stop[t["stop_reason"]] = stop.get(t["stop_reason"], 0) + 1
    candidates = [c for n in nodes for c in n["candidates"]]
    return dict(questions=len(trees), stop_reasons=stop,
                steps_per_solution=sum(len(t["solution_steps"]) for t in trees) / max(1, len(trees)),
                rounds=sum(t["rounds"] for t in trees),
                tie_rollbacks=sum(n["outcome"] == "tie_rollback" for n in nodes), candidates=len(candidates),
                candidates_eos=sum(c["eos"] for c in candidates), candidates_final=sum(c["final"] for c in candidates),
                verdicts=len(verdicts), unparsed=sum(v["verdict"] is None for v in verdicts),
                verdicts_a=sum(v["verdict"] == "A" for v in verdicts),
                verdicts_b=sum(v["verdict"] == "B" for v in verdicts),
                order_disagreement=order_disagreement(verdicts))


# ----------------------------------------------------------------------------------------------------------------
# flags several stages share, each defined once (one name and one default per setting); argument types that stop a
# bad value where the flags are read, before any model loads


def checked(kind, ok, expected):
    """An argparse type: kind(text) that must satisfy ok, else argparse's one-line error 'expected ...'."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    parse.__name__ = expected
    return parse


positive_int = checked(int, lambda v: v >= 1, "an integer >= 1")
nonnegative_int = checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = checked(float, lambda v: v > 0, "a number > 0")
nonnegative_float = checked(float, lambda v: v >= 0, "a number >= 0")
fraction = checked(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
probability = checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
unit_float = checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def add_model_args(parser, required=True):
    """The model a stage loads: M_t as a directory (full weights or a LoRA adapter naming its base) or a hub name."""
    parser.add_argument("--model", required=required, help="model directory (or LoRA adapter directory) or hub name")
    parser.add_argument("--load-in-4bit", action="store_true", help="QLoRA: NF4 base weights (CUDA + bitsandbytes)")
    parser.add_argument("--attn", default="sdpa", help="sdpa | flash_attention_2 (CUDA + flash-attn) | eager")


def add_generation_args(parser):
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                        help="hf: plain HF generate (the reference); vllm: the same generation through vLLM "
                             "(vllm_engine.py; pip install -r requirements-vllm.txt; docs/vllm.md)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="sequences per generate call (hf)")
    parser.add_argument("--prefill-chunk", type=nonnegative_int, default=0,
                        help="prompt tokens per prefill forward (0: all at once); caps the prefill's activations, "
                             "the memory peak of large batches (docs/gpu.md)")


def add_search_args(parser):
    """How the step search (step_search.py, paper §3.3) samples: generate.py, and evaluate.py --search at test time."""
    parser.add_argument("--num-candidates", type=checked(int, lambda v: v >= 2, "an integer >= 2 (a pair to judge)"),
                        default=6, help="w, paper §4")
    parser.add_argument("--temperature", type=nonnegative_float, default=0.5, help="paper §4")
    parser.add_argument("--top-p", type=probability, default=0.95, help="paper §4")
    parser.add_argument("--max-steps", type=positive_int, default=20,
                        help="paper: max iteration number 20 (search rounds)")
    parser.add_argument("--max-step-tokens", type=positive_int, default=256, help="new tokens per candidate step")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (every draw is seeded per question)")


def add_judge_args(parser):
    """The step judge (paper §3.1, Fig. 5) and how the search uses it (the re-judge CLI too)."""
    parser.add_argument("--prompt-judge", default="judge", help="paper Fig. 5; the tiny default: judge_tiny")
    parser.add_argument("--judge-max-new-tokens", type=positive_int, default=512,
                        help="the judge's explanation + verdict")
    parser.add_argument("--stop-at-verdict", action="store_true",
                        help="stop the judge right after its first [[A]]/[[B]] (a cost lever; the paper's judge "
                             "writes on; docs/vllm.md measures it)")
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
    parser.add_argument("--lora-rank", type=positive_int, default=16, help="LoRA r")
    parser.add_argument("--lora-alpha", type=positive_int, default=32, help="LoRA alpha (scale = alpha / r)")
    parser.add_argument("--lora-layers", type=nonnegative_int, default=0,
                        help="LoRA on the last N transformer layers only (0: all); the backward pass then stops at the "
                        "lowest adapted layer (CPU budget of the smollm2 preset; not the paper's)")
    parser.add_argument("--lora-dropout", type=fraction, default=0.0,
                        help="0 by default so policy and reference agree exactly at step 0 (DPO loss = log 2)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--optim", default="adamw", help="adamw | paged_adamw_8bit (bitsandbytes, CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
