"""
prepare/synthetic.py and the JSONL plumbing of common.py: the generated data is reproducible, well formed and
arithmetically right (checked against the numbers re-read from each question's sentences, not against the
generator's own bookkeeping), the EFT labels point at the uncorrupted step, and bad input fails with file:line.

    python -m pytest tests/test_synthetic.py -q
"""

import json
import os
import random
import re
import subprocess
import sys
from collections import Counter

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from prepare import synthetic as prepare_synthetic  # noqa: E402
from common import BOXED, DataError, PartialJSONL, parse_verdict, read_jsonl, split_steps  # noqa: E402
from conftest import make_synthetic  # noqa: E402

MIN_STEPS, MAX_STEPS = 2, 4  # the fixture's (default) knobs
STEP = re.compile(r"Step (\d+): (.+?): (\d+) ([-+*/]) (\d+) = (-?\d+)\.(?: The answer is \\boxed\{(-?\d+)\}\.)?")
APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}


def sentence_patterns():
    """Each problem sentence template as a regex capturing its number, with the operation it tells."""
    patterns = []
    for op, templates in prepare_synthetic.SENTENCES.items():
        for t in templates:
            rx = re.escape(t).replace(r"\{n\}", r"(\d+)")
            for name in "pof":
                rx = rx.replace(r"\{" + name + r"\}", r"\w+")
            patterns.append((re.compile(rx + "$"), op))
    return patterns


PATTERNS = sentence_patterns()


def question_sentences(question):
    """A question's sentences, as told: the start, one per operation, the question."""
    return [s.strip() for s in re.findall(r"[^.?]+[.?]", question)]


def gold_chain(question):
    """Re-read a question: its start value and [(a, op, b, c)] for every told operation, computed here."""
    sentences = question_sentences(question)
    start = int(re.fullmatch(r"\w+ has (\d+) \w+\.", sentences[0]).group(1))
    assert re.fullmatch(r"How many \w+ does \w+ have now\?", sentences[-1])
    value, facts = start, []
    for s in sentences[1:-1]:
        found = [(m, op) for rx, op in PATTERNS for m in [rx.fullmatch(s)] if m]
        assert len(found) == 1, s
        m, op = found[0]
        b = int(m.group(1))
        facts.append((value, op, b, APPLY[op](value, b)))
        value = facts[-1][3]
    return start, facts


def parse_step(step):
    m = STEP.fullmatch(step)
    assert m, step
    k, reason, a, op, b, c, boxed = m.groups()
    return int(k), reason, (int(a), op, int(b), int(c)), None if boxed is None else int(boxed)


def question_numbers(question):
    return [int(t.rstrip(".")) for t in question.split() if t.rstrip(".").isdigit()]


def run_prepare(out_dir, seed, monkeypatch, *flags):
    monkeypatch.setattr(sys, "argv", ["prepare_synthetic.py", "--out-dir", str(out_dir), "--seed", str(seed),
                                      "--num-ift", "60", "--num-eft", "40", "--num-questions", "3,3,3",
                                      "--num-dev", "5", "--num-test", "5", "--num-eft-test", "6", *flags])
    prepare_synthetic.main()
    return {f: open(os.path.join(out_dir, f), "rb").read() for f in sorted(os.listdir(out_dir)) if f.endswith(".jsonl")}


# ----------------------------------------------------------------------------------------------------------------
# the generator


def test_same_seed_same_bytes_other_seed_other_data(tmp_path, monkeypatch, capsys):
    first = run_prepare(tmp_path / "a", 7, monkeypatch)
    again = run_prepare(tmp_path / "b", 7, monkeypatch)
    other = run_prepare(tmp_path / "c", 8, monkeypatch)
    assert len(first) == 9 and all(len(v) > 0 for v in first.values())
    assert first == again  # byte-identical, every file
    assert all(first[f] != other[f] for f in first)
    # a finished run is not redone: config.json is written last and marks it done
    mtime = os.path.getmtime(tmp_path / "a" / "ift.jsonl")
    run_prepare(tmp_path / "a", 7, monkeypatch)
    assert "skipping" in capsys.readouterr().out
    assert os.path.getmtime(tmp_path / "a" / "ift.jsonl") == mtime


def test_operand_first_shapes_the_training_pairs_only(tmp_path, monkeypatch):
    """--eft-operand-first: the judge's training pairs get more wrong operands; every other file stays byte for
    byte what the uniform draw writes (the held-out pairs measure every design on one mix)."""
    kinds = lambda files: Counter(json.loads(line)["error"] for line in files["eft.jsonl"].splitlines())
    by_share = {p: run_prepare(tmp_path / p, 7, monkeypatch, "--num-eft", "300", "--eft-operand-first", p)
                for p in ("0", "0.5", "1")}
    for p in ("0.5", "1"):
        assert [f for f in by_share[p] if by_share[p][f] != by_share["0"][f]] == ["eft.jsonl"]
    share = {p: kinds(files)["operand"] / 300 for p, files in by_share.items()}
    assert share["0"] < 0.45 < share["0.5"] < share["1"]
    assert share["1"] > 0.75  # the rest: steps where no other number of the question makes a valid wrong operand
    assert set(kinds(by_share["1"])) == {"arithmetic", "operand", "operation"}
    # 0 writes what the generator wrote before the flag, so its data sets' manifests stay valid: the flag is left out
    flags = lambda p: json.load(open(tmp_path / p / "config.json.manifest.json"))["flags"]
    assert "eft_operand_first" not in flags("0") and flags("0.5")["eft_operand_first"] == 0.5


def test_sentence_labels_number_the_question_and_change_nothing_else(tmp_path, monkeypatch):
    """--sentence-labels: each step's sentence in the question starts with its number ("2: She sells 3."), as the
    step and the judge's reading number theirs; every record is otherwise what the unlabelled draw writes, and the
    task's ground truth (solve, step_is_right, step_sentence) reads a labelled question as the unlabelled one."""
    plain = run_prepare(tmp_path / "plain", 7, monkeypatch)
    labelled = run_prepare(tmp_path / "labelled", 7, monkeypatch, "--sentence-labels")
    assert plain.keys() == labelled.keys()
    unlabel = lambda q: re.sub(r"(?<=[.]) \d+: ", " ", q)
    for name in plain:
        for a, b in zip(plain[name].splitlines(), labelled[name].splitlines(), strict=True):
            a, b = json.loads(a), json.loads(b)
            sentences = question_sentences(b["question"])
            assert [re.match(r"\d+: ", s) and int(s.split(":")[0]) for s in sentences[1:-1]] == \
                list(range(1, len(sentences) - 1))  # every step sentence numbered, in order; no other
            assert not re.match(r"\d+: ", sentences[0]) and b["question"] != a["question"]
            assert {**b, "question": unlabel(b["question"])} == a
            q = b["question"]
            assert prepare_synthetic.solve(q) == prepare_synthetic.solve(a["question"])
            assert all(prepare_synthetic.step_sentence(q, k) == prepare_synthetic.step_sentence(a["question"], k)
                       for k in range(1, len(sentences) - 1))
            if name == "ift.jsonl":
                steps = split_steps(b["solution"])
                assert all(prepare_synthetic.step_is_right(q, k, s) for k, s in enumerate(steps, 1))
                assert not prepare_synthetic.step_is_right(q, 1, steps[0].replace(" = ", " = 1"))
    # off writes what the generator wrote before the flag: it is left out of the data set's manifest
    flags = lambda d: json.load(open(tmp_path / d / "config.json.manifest.json"))["flags"]
    assert "sentence_labels" not in flags("plain") and flags("labelled")["sentence_labels"] is True


def test_noisy_facts_write_a_fixed_set_of_wrong_results_into_the_solutions_only(tmp_path, monkeypatch):
    """--noisy-facts: a fixed fifth of the task's facts (a op b) get one wrong result each (off by one), which the
    solutions write about 60 % of the times they use the fact and carry on; every other step is right, every other
    file and each solution's question and answer are what the noise-free draw writes."""
    more = ("--num-ift", "2000")
    plain = run_prepare(tmp_path / "plain", 7, monkeypatch, *more)
    noisy = run_prepare(tmp_path / "noisy", 7, monkeypatch, *more, "--noisy-facts", "0.2")
    assert [f for f in plain if plain[f] != noisy[f]] == ["ift.jsonl"]
    wrong, uses, written_wrong = {}, Counter(), 0  # fact -> the wrong results written for it; fact -> times used
    for a_line, b_line in zip(plain["ift.jsonl"].splitlines(), noisy["ift.jsonl"].splitlines(), strict=True):
        r, n = json.loads(a_line), json.loads(b_line)
        assert {**n, "solution": r["solution"]} == r
        start, facts = gold_chain(n["question"])
        steps = split_steps(n["solution"])
        assert len(steps) == len(facts)
        previous = start
        for k, (step, (_, true_op, true_b, _)) in enumerate(zip(steps, facts), 1):
            number, _, (a, op, b, c), boxed = parse_step(step)
            assert number == k and a == previous and (op, b) == (true_op, true_b)  # the value written is carried
            assert (boxed is not None) == (k == len(steps)) and boxed in (None, c)
            uses[a, op, b] += 1
            if c != APPLY[op](a, b):
                assert abs(c - APPLY[op](a, b)) == 1 and 0 <= c <= 20
                wrong.setdefault((a, op, b), set()).add(c)
                written_wrong += 1
            previous = c
    in_range = sum(1 for op in "+-" for b in range(1, 10) for a in range(21) if 0 <= APPLY[op](a, b) <= 20)
    assert all(len(values) == 1 for values in wrong.values())  # one wrong result per fact
    assert 0.9 * round(0.2 * in_range) <= len(wrong) <= round(0.2 * in_range)
    assert 0.5 < written_wrong / sum(uses[f] for f in wrong) < 0.7
    # off writes what the generator wrote before the flag: it is left out of the data set's manifest
    flags = lambda d: json.load(open(tmp_path / d / "config.json.manifest.json"))["flags"]
    assert "noisy_facts" not in flags("plain") and flags("noisy")["noisy_facts"] == 0.2


def test_wrong_facts_counts_the_errors_and_the_search_steps_on_the_wrong_facts(tmp_path, monkeypatch):
    """scripts/wrong_facts.py on a run made here: a greedy solution that first errs by writing a wrong fact's wrong
    result counts as on a wrong fact, three off by two as other (one of them on that fact's step); a search step on
    that fact with one wrong and one right candidate is mixed, and a verdict for the wrong one is a wrong pick on a
    wrong fact (another, on a right fact's step, only counts in all)."""
    data, run = tmp_path / "data", tmp_path / "run"
    run_prepare(data, 7, monkeypatch, "--num-ift", "300", "--noisy-facts", "0.2")
    wrong = prepare_synthetic.wrong_facts_of(json.load(open(data / "config.json")))
    noisy = next(r for r in read_jsonl(str(data / "ift.jsonl"), ["question", "solution"])
                 if not prepare_synthetic.solution_is_right(r["question"], r["solution"]))
    question, steps = noisy["question"], split_steps(noisy["solution"])
    k = next(k for k, step in enumerate(steps, 1) if not prepare_synthetic.step_is_right(question, k, step))
    _, _, (a, op, b, _), _ = parse_step(steps[k - 1])
    assert (a, op, b) in wrong  # the noise's first wrong step writes a wrong fact
    right = prepare_synthetic.gold_steps(question)
    first_fact = lambda q: (prepare_synthetic.solve(q)[0], *prepare_synthetic.parse_question(q)[1][0])
    others = [r["question"] for r in read_jsonl(str(data / "test.jsonl"), ["question"])
              if first_fact(r["question"]) not in wrong][:2]
    assert len(others) == 2
    gold = [prepare_synthetic.gold_steps(q) for q in others]
    off_by_two = lambda step: re.sub(r"= (\d+)", lambda m: f"= {int(m[1]) + 2}", step)
    off = [[off_by_two(g[0])] + g[1:] for g in gold]
    off_on_the_fact = steps[:k - 1] + [off_by_two(right[k - 1])]
    (run / "iter0" / "eval").mkdir(parents=True), (run / "iter1").mkdir()
    evals = [(question, steps, False), (others[0], off[0], False), (others[1], off[1], False),
             (question, off_on_the_fact, False), (others[0], gold[0], True)]
    with open(run / "iter0" / "eval" / "test.jsonl", "w") as f:
        for q, solution, correct in evals:
            f.write(json.dumps(dict(question=q, output="\n".join(solution), correct=correct)) + "\n")
    pick_a = [dict(i=0, j=1, verdict="A")]  # the first candidate, the wrong one
    trees = [dict(question=question, steps=[dict(step=k, prefix_steps=steps[:k - 1], verdicts=pick_a, candidates=[
                 dict(text=steps[k - 1]), dict(text=right[k - 1])])]),
             dict(question=others[0], steps=[dict(step=1, prefix_steps=[], verdicts=pick_a, candidates=[
                 dict(text=off[0][0]), dict(text=gold[0][0])])])]
    (run / "iter1" / "trees.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trees))
    out = subprocess.run([sys.executable, "-m", "scripts.wrong_facts", "--run", str(run), "--data", str(data)],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert "M1 | 1 / 3 | 0 / 1 / 0 | 1 / 2" in lines and "M2 | - | - | -" in lines, out
    assert any(line.startswith(f"{a} {op} {b} | ") and line.endswith(" | [1]") for line in lines), out


@pytest.fixture(params=["short", "sentence"])
def data_dir(request):
    """(step_reason, the small data set written with it): the default (copied sentences, the judge rereads) and the
    previous default (short reasons, the count judge); the tests below hold for both."""
    return request.param, request.getfixturevalue({"short": "synthetic_short_dir", "sentence": "synthetic_dir"}[
        request.param])


def expected_reason(step_reason, question, k, op, b):
    """What step k must write before its equation, from this file's own reading of the question."""
    if step_reason == "short":
        return prepare_synthetic.REASONS[op].format(n=b)
    sentence = question_sentences(question)[k].rstrip(".")  # sentence k, without its period
    return re.sub(r"\d+", str(b), sentence)  # its one number, the operand: b (another number for an operand error)


def test_ift_solutions_are_numbered_chained_and_correct(data_dir):
    step_reason, synthetic_dir = data_dir
    records = read_jsonl(os.path.join(synthetic_dir, "ift.jsonl"), ["id", "question", "solution", "answer"])
    assert len(records) == 300
    lengths = Counter()
    for r in records:
        steps = r["solution"].split("\n")
        assert split_steps(r["solution"]) == steps  # one step per line, the common splitter agrees
        start, facts = gold_chain(r["question"])
        assert MIN_STEPS <= len(steps) <= MAX_STEPS and len(steps) == len(facts)
        lengths[len(steps)] += 1
        previous = start
        for k, (step, fact) in enumerate(zip(steps, facts), 1):
            number, reason, said, boxed = parse_step(step)
            a, op, b, c = said
            assert number == k
            assert a == previous  # the chain: each step starts from the last result
            assert APPLY[op](a, b) == c  # the arithmetic is right
            assert said == fact  # and it is what the question tells
            assert reason == expected_reason(step_reason, r["question"], k, op, b)
            assert (boxed is not None) == (k == len(steps)) and (BOXED in step) == (k == len(steps))
            previous = c
        assert boxed == facts[-1][3] and r["answer"] == str(boxed)
        assert prepare_synthetic.gold_steps(r["question"], step_reason) == steps
    assert set(lengths) == {2, 3, 4}  # the whole range is used
    for name in ["test", "dev", "questions1", "questions2", "questions3"]:
        for r in read_jsonl(os.path.join(synthetic_dir, f"{name}.jsonl"), ["id", "question", "answer"]):
            assert r["answer"] == str(gold_chain(r["question"])[1][-1][3])


def test_no_question_in_two_files(synthetic_dir):
    where = {}
    files = [f for f in os.listdir(synthetic_dir) if f.endswith(".jsonl")]
    assert len(files) == 9
    for f in files:
        for r in read_jsonl(os.path.join(synthetic_dir, f), ["id", "question"]):
            assert r["question"] not in where, (f, where.get(r["question"]))
            where[r["question"]] = f
    assert len(where) == 300 + 200 + 3 * 6 + 20 + 20 + 2 * 20


@pytest.mark.parametrize("name, n", [("eft", 200), ("eft_test", 20), ("eft_dev", 20)])
def test_eft_label_points_at_the_uncorrupted_step(data_dir, name, n):
    step_reason, synthetic_dir = data_dir
    records = read_jsonl(os.path.join(synthetic_dir, f"{name}.jsonl"),
                         ["question", "previous_steps", "step_a", "step_b", "label", "judgment", "error"])
    assert len(records) == n
    assert Counter(r["label"] for r in records) == {"A": n // 2, "B": n // 2}  # exactly balanced
    kinds = Counter()
    for r in records:
        _, facts = gold_chain(r["question"])
        k = len(r["previous_steps"])
        assert k < len(facts)
        for j, prev in enumerate(r["previous_steps"]):  # the previous steps are the gold ones
            assert parse_step(prev)[2] == facts[j] and parse_step(prev)[0] == j + 1
        good, bad = (r["step_a"], r["step_b"]) if r["label"] == "A" else (r["step_b"], r["step_a"])
        gk, good_reason, good_fact, good_box = parse_step(good)
        bk, bad_reason, (a, op, b, c), bad_box = parse_step(bad)
        assert gk == bk == k + 1
        # the right step gives the step's true reason; the wrong one too, except that a step copying its sentence
        # copies its error into it, as the policy's own errors do: "He buys 10 more" (operand) or "He loses 1"
        # (operation) for "He buys 1 more"
        assert good_reason == expected_reason(step_reason, r["question"], k + 1, *facts[k][1:3])
        if step_reason == "short" or r["error"] == "arithmetic":
            assert bad_reason == good_reason
        elif r["error"] == "operand":
            assert bad_reason == expected_reason(step_reason, r["question"], k + 1, op, b)
        else:  # a sentence that tells the wrong operation, with the step's operand
            told = [(rx.fullmatch(bad_reason + "."), told_op) for rx, told_op in PATTERNS]
            assert [(int(m.group(1)), told_op) for m, told_op in told if m] == [(b, op)]
        assert good_fact == facts[k]
        final = k == len(facts) - 1
        assert (good_box == facts[k][3]) if final else good_box is None
        assert (bad_box == c) if final else bad_box is None
        ga, gop, gb, gc = facts[k]
        assert (a, op, b, c) != facts[k]
        # the error kind is what changed, and the rest of the step is internally consistent
        if r["error"] == "arithmetic":
            assert (a, op, b) == (ga, gop, gb) and c != gc
        elif r["error"] == "operand":
            assert (a, op) == (ga, gop) and b != gb and b in question_numbers(r["question"])
            assert c == APPLY[op](a, b)
        else:
            assert r["error"] == "operation"
            assert (a, b) == (ga, gb) and op != gop and c == APPLY[op](a, b)
        kinds[r["error"]] += 1
        # the judgment reads both results, (reread) the question's sentences of steps 1..k + 1, counts the gold step
        # out, compares each result with the gold one: checked by this file's own reader
        got_a, got_b = (gc, c) if r["label"] == "A" else (c, gc)
        told = question_sentences(r["question"])[1:k + 2] if step_reason == "sentence" else ()
        assert check_judgment(r["judgment"], got_a, got_b, ga, gop, gb, reread=told) == r["label"]
        assert f"Want Step {k + 1}: {good_reason}: " in r["judgment"] and r["judgment"].endswith(f"[[{r['label']}]]")
    if n >= 200:
        assert set(kinds) == {"arithmetic", "operand", "operation"} and min(kinds.values()) >= 20


JUDGMENT = re.compile(r"A: (\d+)\. B: (\d+)\. ((?:Read \d+: [^.]+\. )*)(?:Read: (.+?) )?Want (?:\"([^\"]+)\" )?"
                      r"(?:Step (\d+): )?(?:(.+): )?(\d+) ([-+*/]) (\d+): (.*)\. "
                      r"A: (\d+) vs (\d+): (.*), (right|wrong)\. B: (\d+) vs (\d+): (.*), (right|wrong)\. "
                      r"\[\[([AB])\]\]$")


# what each chain check writes before the equation it counts out: nothing, the step's head, its number, the sentence
CHAIN_HEADS = {"chain": None, "chain-step": "step", "chain-head": "number", "chain-sentence": "sentence"}


def check_judgment(text, got_a, got_b, a, op, b, sentence=None, reread=(), chain=None, head="step"):
    """An independent reading of one judgment: the quoted sentence (None: none), the sentences read before the count
    (reread: those of steps 1..k, in order, numbered from 1; chain: the question's text from its start through step
    k's sentence), what the count line writes before the equation (head: "step" "Step 2: She sells 3", "number"
    "Step 2", "sentence" the sentence just read, None nothing), every count, digit comparison and decision in it."""
    m = JUDGMENT.fullmatch(text)
    assert m, text
    read_a, read_b, reads, chained, quoted, step_k, reason, a2, op2, b2, work, pad_a, want_a, digits_a, ok_a, pad_b, \
        want_b, digits_b, ok_b, verdict = m.groups()
    assert quoted == sentence and chained == chain
    assert (step_k is not None) == (head in ("step", "number"))
    assert (reason is not None) == (head in ("step", "sentence"))
    if head == "sentence":  # the count starts with the sentence the reading ended on, without its period
        assert chain.endswith(f" {reason}.")
    assert re.findall(r"Read (\d+): ([^.]+\.) ", reads) == [(str(j), t) for j, t in enumerate(reread, 1)]
    assert (int(read_a), int(read_b), int(a2), op2, int(b2)) == (got_a, got_b, a, op, b)
    want = APPLY[op](a, b)
    if op in "+-":  # one unit at a time, numbered, ending at the right value
        unit = 1 if op == "+" else -1
        assert work.split(", ") == [f"{a + unit * i} ({i})" for i in range(1, b + 1)]
    else:
        assert work == str(want)
    for got, pad, right, digits, ok in [(got_a, pad_a, want_a, digits_a, ok_a), (got_b, pad_b, want_b, digits_b, ok_b)]:
        assert int(pad) == got and int(right) == want and len(pad) == len(right) >= 2
        pieces = digits.split(", ")
        assert pieces == [f"{x} {y} {'same' if x == y else 'differ'}" for x, y in zip(pad, right)]
        assert ok == ("right" if got == want else "wrong")
    return verdict


@pytest.mark.parametrize("check", ["count", "quote", "reread", *prepare_synthetic.CHAIN_CHECKS])
@pytest.mark.parametrize("op", ["+", "-", "*", "/"])
def test_judgment_is_right_on_every_operand_pair_and_near_miss_of_a_grid(op, check):
    """The default check (reread), the chain checks, count and quote on a grid: every start 0..20 and operand 1..9
    the task allows, the right result against every result 0..30 (near misses, carries and borrows across the tens:
    9 -> 10, 10 -> 9, 19 -> 20), in both positions; the verdict points at the right step, and common.parse_verdict
    reads it."""
    pairs = 0
    for a in range(0, 21):
        for b in range(1, 10):
            if (op == "-" and b > a) or (op == "/" and a % b) or (op == "*" and b > 5):
                continue
            want = APPLY[op](a, b)
            gold = f"Step 2: {b} more: {a} {op} {b} = {want}."
            for wrong in range(0, 31):
                if wrong == want:
                    continue
                bad = gold.replace(f"= {want}.", f"= {wrong}.")
                for label, (step_a, step_b) in [("A", (gold, bad)), ("B", (bad, gold))]:
                    told = ["She loses 1.", f"She buys {b} more."]  # the question's sentences of steps 1 and 2
                    start = f"Ann has {a + 1} apples."  # and its first sentence (chain reads from there)
                    text = prepare_synthetic.judgment(gold, step_a, step_b, label, check,
                                                      [start] + told if check.startswith("chain") else told)
                    got_a, got_b = (want, wrong) if label == "A" else (wrong, want)
                    quoted, reread = (told[-1] if check == "quote" else None), (told if check == "reread" else ())
                    chain = " ".join([start] + told) if check.startswith("chain") else None
                    verdict = check_judgment(text, got_a, got_b, a, op, b, quoted, reread, chain,
                                             CHAIN_HEADS.get(check, "step"))
                    assert verdict == label == parse_verdict(text)
                    pairs += 1
    assert pairs > 1000


def test_judgment_examples_of_the_checks():
    gold, near = "Step 2: 3 fewer: 17 - 3 = 14.", "Step 2: 3 fewer: 17 - 3 = 15."
    told = ["He buys 7 more.", "She sells 3."]
    assert prepare_synthetic.judgment(gold, gold, near, "A", "quote", told) == (
        'A: 14. B: 15. Want "She sells 3." Step 2: 3 fewer: 17 - 3: 16 (1), 15 (2), 14 (3). '
        "A: 14 vs 14: 1 1 same, 4 4 same, right. B: 15 vs 14: 1 1 same, 5 4 differ, wrong. [[A]]")
    sentence_gold = "Step 2: She sells 3: 17 - 3 = 14."
    assert prepare_synthetic.judgment(sentence_gold, sentence_gold.replace("14", "15"), sentence_gold, "B", "reread",
                                      told) == (
        "A: 15. B: 14. Read 1: He buys 7 more. Read 2: She sells 3. Want Step 2: She sells 3: 17 - 3: 16 (1), 15 (2), "
        "14 (3). A: 15 vs 14: 1 1 same, 5 4 differ, wrong. B: 14 vs 14: 1 1 same, 4 4 same, right. [[B]]")
    assert prepare_synthetic.judgment(sentence_gold, sentence_gold, sentence_gold.replace("14", "15"), "A", "chain",
                                      ["Ann has 10 apples."] + told) == (
        "A: 14. B: 15. Read: Ann has 10 apples. He buys 7 more. She sells 3. Want 17 - 3: 16 (1), 15 (2), 14 (3). "
        "A: 14 vs 14: 1 1 same, 4 4 same, right. B: 15 vs 14: 1 1 same, 5 4 differ, wrong. [[A]]")
    assert prepare_synthetic.judgment(sentence_gold, sentence_gold, sentence_gold.replace("14", "15"), "A",
                                      "chain-step", ["Ann has 10 apples."] + told) == (
        "A: 14. B: 15. Read: Ann has 10 apples. He buys 7 more. She sells 3. Want Step 2: She sells 3: 17 - 3: 16 (1), "
        "15 (2), 14 (3). A: 14 vs 14: 1 1 same, 4 4 same, right. B: 15 vs 14: 1 1 same, 5 4 differ, wrong. [[A]]")
    assert prepare_synthetic.judgment(sentence_gold, sentence_gold, sentence_gold.replace("14", "15"), "A",
                                      "chain-head", ["Ann has 10 apples."] + told) == (
        "A: 14. B: 15. Read: Ann has 10 apples. He buys 7 more. She sells 3. Want Step 2: 17 - 3: 16 (1), 15 (2), "
        "14 (3). A: 14 vs 14: 1 1 same, 4 4 same, right. B: 15 vs 14: 1 1 same, 5 4 differ, wrong. [[A]]")
    assert prepare_synthetic.judgment(sentence_gold, sentence_gold, sentence_gold.replace("14", "15"), "A",
                                      "chain-sentence", ["Ann has 10 apples."] + told) == (
        "A: 14. B: 15. Read: Ann has 10 apples. He buys 7 more. She sells 3. Want She sells 3: 17 - 3: 16 (1), 15 (2), "
        "14 (3). A: 14 vs 14: 1 1 same, 4 4 same, right. B: 15 vs 14: 1 1 same, 5 4 differ, wrong. [[A]]")
    for check in ("quote", "reread", *prepare_synthetic.CHAIN_CHECKS):
        with pytest.raises(ValueError, match="sentences"):
            prepare_synthetic.judgment(gold, gold, near, "A", check)  # nothing to quote or read
    assert prepare_synthetic.judgment(gold, gold, near, "A") == (
        "A: 14. B: 15. Want Step 2: 3 fewer: 17 - 3: 16 (1), 15 (2), 14 (3). "
        "A: 14 vs 14: 1 1 same, 4 4 same, right. B: 15 vs 14: 1 1 same, 5 4 differ, wrong. [[A]]")
    final = "Step 3: 2 more: 7 + 2 = 9. The answer is \\boxed{9}."
    assert prepare_synthetic.judgment(final, final.replace("9", "10"), final, "B") == (
        "A: 10. B: 9. Want Step 3: 2 more: 7 + 2: 8 (1), 9 (2). "
        "A: 10 vs 09: 1 0 differ, 0 9 differ, wrong. B: 09 vs 09: 0 0 same, 9 9 same, right. [[B]]")
    assert prepare_synthetic.judgment(gold, near, gold, "B", check="vs") == \
        "Want Step 2: 3 fewer: 17 - 3 = 14. A: 15 vs 14, wrong. B: 14 vs 14, right. [[B]]"


def test_an_unfinished_judgment_has_no_verdict():
    gold, near = "Step 2: 3 fewer: 17 - 3 = 14.", "Step 2: 3 fewer: 17 - 3 = 15."
    text = prepare_synthetic.judgment(gold, gold, near, "A")
    assert [parse_verdict(text[:cut]) for cut in (len(text) - 2, len(text) // 2, 0)] == [None] * 3
    assert parse_verdict(text + " [[B]]") is None  # both letters: unparseable


def test_a_wrong_solution_copies_its_error_into_its_sentence():
    """The SRLM EFT's wrong solutions (wrong_solution) with copied sentences: the first wrong step's sentence tells
    the operation and operand its equation used (arithmetic errors keep the true one), the later steps' are true."""
    rng, kinds = random.Random(3), Counter()
    for _ in range(200):
        start, chain = prepare_synthetic.sample_problem(rng, 12, 9, 2, 4, "+-", 20, "uniform")
        q, steps, facts, _ = prepare_synthetic.render(rng, start, chain, "sentence")
        wrong = prepare_synthetic.wrong_solution(rng, q, steps, facts, chain, "sentence")
        if wrong is None:
            continue
        k = next(j for j, (w, s) in enumerate(zip(wrong, steps)) if w != s)
        kind = prepare_synthetic.step_error_kind(q, k + 1, wrong[k])
        kinds[kind] += 1
        _, reason, (a, op, b, c), _ = parse_step(wrong[k])
        told = [(int(m.group(1)), told_op) for rx, told_op in PATTERNS for m in [rx.fullmatch(reason + ".")] if m]
        true_op, true_b = facts[k][1:3]
        assert told == ([(true_b, true_op)] if kind == "arithmetic" else [(b, op)])
        for j in range(k + 1, len(wrong)):
            assert parse_step(wrong[j])[1] == expected_reason("sentence", q, j + 1, *facts[j][1:3])
    assert set(kinds) == {"arithmetic", "operand", "operation"}


def test_step_oracle_agrees_with_the_questions_and_catches_each_error(data_dir):
    """prepare_synthetic.solve / step_is_right (the oracle judge and the label check) against this file's parser."""
    _, synthetic_dir = data_dir
    for r in read_jsonl(os.path.join(synthetic_dir, "ift.jsonl")):
        start, facts = gold_chain(r["question"])
        assert prepare_synthetic.solve(r["question"]) == [start] + [c for *_, c in facts]
        for k, step in enumerate(r["solution"].split("\n"), 1):
            assert prepare_synthetic.step_is_right(r["question"], k, step)
    for r in read_jsonl(os.path.join(synthetic_dir, "eft.jsonl")):  # every corruption kind is caught
        k = len(r["previous_steps"]) + 1
        verdicts = [prepare_synthetic.step_is_right(r["question"], k, r[s]) for s in ("step_a", "step_b")]
        assert verdicts == ([True, False] if r["label"] == "A" else [False, True])
    q = "Tom has 5 pens. He buys 4 more. He loses 2. How many pens does Tom have now?"
    right = prepare_synthetic.step_is_right
    assert right(q, 1, "Step 1: 4 more: 5 + 4 = 9.")
    assert right(q, 2, "Step 2: 2 fewer: 9 - 2 = 7. The answer is \\boxed{7}.")
    assert not right(q, 1, "Step 1: 4 more: 5 + 4 = 9. The answer is \\boxed{9}.")  # answers too early
    assert not right(q, 2, "Step 2: 2 fewer: 9 - 2 = 7.")  # last step without the answer
    assert not right(q, 2, "Step 2: 2 fewer: 9 - 2 = 7. The answer is \\boxed{8}.")  # boxes another number
    assert not right(q, 1, "Step 1: 4 more: 5 + 3 = 9.")  # right value, false equation
    assert not right(q, 2, "Step 2: 2 fewer: 10 - 2 = 8. The answer is \\boxed{8}.")  # carries a wrong value on
    assert not right(q, 3, "Step 3: 1 more: 7 + 1 = 8.") and not right(q, 1, "Step 1: I think it is 9.")
    # an operand 0, which a model may write (the generator never does), is a wrong step, not a division by zero
    assert not right(q, 2, "Step 2: 0 fewer: 9 - 0 = 9.") and not right(q, 2, "Step 2: 0 fewer: 9 / 0 = 9.")
    assert prepare_synthetic.step_error_kind(q, 2, "Step 2: 0 fewer: 9 - 0 = 9.") == "operand"
    with pytest.raises(ValueError, match="not a synthetic question"):
        prepare_synthetic.solve("Let $x^2 = 4$. Find $x$.")


# ----------------------------------------------------------------------------------------------------------------
# JSONL errors and resumable progress


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1, "question": "q"}\n\n{"id": 2, "question": \n')
    with pytest.raises(DataError, match=re.escape(f"{path}:3: not valid JSON")):
        read_jsonl(str(path))
    path.write_text('{"id": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:2: expected a JSON object")):
        read_jsonl(str(path))
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(str(tmp_path / "missing.jsonl"))


def test_missing_field_is_named(tmp_path):
    path = tmp_path / "ift.jsonl"
    path.write_text('{"question": "q", "solution": "s"}\n{"question": "q2"}\n')
    assert len(read_jsonl(str(path), ["question"])) == 2
    with pytest.raises(DataError) as e:
        read_jsonl(str(path), ["question", "solution"])
    assert f"{path}:2:" in str(e.value) and "['solution']" in str(e.value)


def test_partial_drops_torn_line_and_resumes_without_duplicates(tmp_path, capsys):
    out = str(tmp_path / "trees.jsonl")
    records = [dict(id=f"q{i}", value=i * i) for i in range(5)]
    manifest = dict(stage="test", inputs={}, flags={})
    progress = PartialJSONL(out, manifest)
    progress.add(records[:2])
    progress.file.write(b'{"id": "q2", "val')  # killed in the middle of writing the third record
    progress.file.close()
    resumed = PartialJSONL(out, manifest)
    assert "resuming: 2 records" in capsys.readouterr().out
    assert sorted(resumed.done) == ["q0", "q1"]
    todo = [r for r in records if r["id"] not in resumed.done]
    assert [r["id"] for r in todo] == ["q2", "q3", "q4"]
    resumed.add(todo[:1])
    resumed.file.close()
    # the torn bytes were cut, so the appended record sits on its own line and a second resume parses it
    header, *lines = open(out + ".partial").read().splitlines()
    assert json.loads(header) == dict(manifest=manifest)  # what made the records: resumed only by the same run
    assert [json.loads(line)["id"] for line in lines] == ["q0", "q1", "q2"]
    last = PartialJSONL(out, manifest)
    last.add([r for r in records if r["id"] not in last.done])
    last.finish([r["id"] for r in records])
    assert read_jsonl(out) == records  # input order, each once
    assert not os.path.exists(out + ".partial")


@pytest.mark.parametrize("ops", ["+-", "+-*/"])
def test_uniform_op_sampling_keeps_values_in_range_and_the_value_says_nothing_of_the_operation(ops):
    """--op-sampling uniform: every chain is valid (values whole, 0..max_value, exact division); given a high or a
    low value the operation is about equally likely, where operand-first lets the value predict it."""
    share = {}
    for mode in ["operand-first", "uniform"]:
        rng, plus = random.Random(0), Counter()
        for _ in range(2000):
            start, chain = prepare_synthetic.sample_problem(rng, 12, 9, 2, 4, ops, 20, mode)
            assert 2 <= len(chain) <= 4
            value = start
            for op, n in chain:
                assert op in ops and (op != "/" or value % n == 0)
                plus[value > 8, op == "+"] += 1
                value = APPLY[op](value, n)
                assert 0 <= value <= 20
        share[mode] = [plus[high, True] / (plus[high, True] + plus[high, False]) for high in (False, True)]
    if ops == "+-":  # the default operations (with * and /, which fit depends on the value's divisors)
        low, high = share["operand-first"]
        assert low - high > 0.2  # operand-first: "+" follows a low value
        low, high = share["uniform"]
        assert abs(low - high) < 0.1


@pytest.mark.parametrize("check", prepare_synthetic.CHAIN_CHECKS)
def test_chain_judgments_copy_the_question_from_its_start_through_the_judged_step(check, tmp_path_factory):
    """--judgment-check chain (chain-step, chain-head, chain-sentence: the count from the step's head, its number, or
    the sentence just read), written by the generator: every EFT judgment reads the question's own text from its first
    sentence through step k's (a prefix of the question), then counts out the true equation, compares and decides as
    the grid above checks; srlm_judgment refuses it (a clear error: prepare.synthetic writes the SRLM
    judgments of a chain data set with reread)."""
    out = make_synthetic(tmp_path_factory, "--judgment-check", check)
    records = read_jsonl(os.path.join(out, "eft.jsonl"), ["question", "previous_steps", "step_a", "step_b", "label",
                                                  "judgment", "error"])
    for r in records:
        k = len(r["previous_steps"])
        _, facts = gold_chain(r["question"])
        ga, gop, gb, gc = facts[k]
        bad = r["step_b"] if r["label"] == "A" else r["step_a"]
        c = parse_step(bad)[2][3]
        got_a, got_b = (gc, c) if r["label"] == "A" else (c, gc)
        chain = " ".join(question_sentences(r["question"])[:k + 2])
        assert r["question"].startswith(chain + " ")
        assert check_judgment(r["judgment"], got_a, got_b, ga, gop, gb, chain=chain,
                              head=CHAIN_HEADS[check]) == r["label"]
    assert Counter(r["error"] for r in records).keys() == {"arithmetic", "operand", "operation"}
    with pytest.raises(ValueError, match="step judge only"):
        prepare_synthetic.srlm_judgment(records[0]["question"], [], check=check, step_reason="sentence")
