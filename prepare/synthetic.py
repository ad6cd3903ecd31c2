"""
The embedded default data set: seeded GSM8K-like word problems that need 2-4 arithmetic steps, written in the
paper's format (`Step n: ...`, final answer in `\\boxed{}`), so the whole pipeline runs offline on a CPU.

Writes, into --out-dir, from disjoint seeds (a problem never appears in two files):
  ift.jsonl        {id, question, solution, answer}                 SFT data for M1 (paper: IFT)
  eft.jsonl        {id, question, previous_steps, step_a, step_b, label, judgment, error}
                                                                     SFT data for M1 (paper: EFT); one step correct,
                                                                     the other corrupted; A/B positions balanced
  questions1..3.jsonl  {id, question, answer}                        fresh questions for iterations 1..3; the loop
                                                                     never reads `answer` (kept for analysis only)
  dev.jsonl, test.jsonl  {id, question, answer}                     tuning split and held-out test (>= 1,000)
  eft_dev.jsonl, eft_test.jsonl                                      held-out judge pairs (>= 500)
  config.json, then config.json.manifest.json (last: the flags that made the set; a rerun skips only if they match)
With --srlm-eft N (off by default; the files above and their manifest do not depend on it), also the SFT data of the
outcome-based SRLM judge (Yuan et al. 2024: whole solutions scored 0-5; generate.py --mode srlm), drawn after and
disjoint from all of the above:
  srlm_eft.jsonl (N), srlm_eft_test.jsonl (--num-eft-test)  {id, question, response, judgment, score}
  half of the solutions right, half with a first error at a random step carried through the later steps;
  judgment: each step checked as the step judge checks a candidate, up to the first wrong one, then the score
  (srlm_judgment, solution_score); its own manifest srlm_eft.jsonl.manifest.json, written last.

Each step copies the question's sentence it acts on, then computes (reason_text): "Step 2: She sells 3: 17 - 3 = 14."
Each operation is drawn uniformly among those that keep the value in range (draw_step), so the value never tells it.
Corruptions (the errors a judge must catch): wrong arithmetic (result off), wrong operand (a number from
elsewhere in the problem), wrong operation (+ instead of -, ...); a wrong step's copied sentence carries its error.
The three kinds are drawn uniformly (32 % wrong operands); --eft-operand-first P makes the judge's training pairs
take a wrong operand first with probability P (0.5: 57 %), the held-out pairs staying uniform (not the default:
docs/experiments.md). --sentence-labels numbers the question's step sentences as the steps number theirs ("Zoe has 8
apples. 1: She gets 8 more. 2: She sells 2. How many ..."), every record otherwise the same (not the default: the
judge reads on most seeds, the policies move; docs/experiments.md). --noisy-facts F writes a fixed fraction F of
the task's facts (a op b) off by one in the solutions, with probability --noisy-fact-rate, the value carried on
(noisy_steps: the policy's room set by its data, not by the SFT's draw).
The loop's default (iterate.sh, since 2026-12-05) is --judgment-check chain --noisy-facts 0.2: the judge copies the
question from its start through the judged step, and a fifth of the facts are wrong in the solutions, so every policy
learns errors its judge catches (docs/experiments.md). This file's own defaults make the data of the default before
(the rereading judge, every fact right).
The judgment reads both results, then the question's sentences up to the step, one by one, counts the step out,
compares each result with its own digit by digit, then the verdict (see judgment):
"A: 14. B: 15. Read 1: He buys 7 more. Read 2: She sells 3. Want Step 2: She sells 3: 17 - 3: 16 (1), 15 (2),
14 (3). A: 14 vs 14: 1 1 same, 4 4 same, right. B: 15 vs 14: 1 1 same, 5 4 differ, wrong. [[A]]"
With chain it copies the question from its start and counts the equation alone: "A: 14. B: 15. Read: Ann has 9
apples. He buys 7 more. She sells 3. Want 17 - 3: 16 (1), 15 (2), 14 (3). A: 14 vs 14: ..." Judgments run to 143
tokens in the rereading judge's data, 130 in the chain's (178 with the space before a number a token of its own;
--judge-max-new-tokens 192). The SFT mix gives the judge most of the budget: 3,500 solutions, 28,500 judgments. The
policy writes `17 - 3 = 14` in one go and learns it from the solutions alone; the judge counts it out, one unit at a
time: the step's arithmetic is where the policy errs and the judge does not.
An earlier default (short reasons "3 fewer", operand-first drawing, no reading, 8,000 solutions and 24,000
judgments): --step-reason short --op-sampling operand-first --judgment-check count --num-ift 8000 --num-eft 24000.

    python -m prepare.synthetic --out-dir data/synthetic
"""

import argparse
import operator
import os
import random
import re

from common import (cli, is_done, output_flags, positive_int, save_config, split_steps, stage_manifest, unit_float,
                    write_jsonl, write_manifest)

NAMES = ["Tom", "Ann", "Ben", "Mia", "Sam", "Lily", "Max", "Eva", "Leo", "Zoe", "Dan", "Ivy"]
ITEMS = ["apples", "pens", "cards", "coins", "books", "eggs", "shells", "stamps", "cookies", "marbles"]
# Each operation: (symbol, sentence told in the problem, short reason written in the step)
SENTENCES = {
    "+": ["{p} buys {n} more.", "{p} finds {n} more.", "{f} gives {o} {n} more.", "{p} gets {n} more."],
    "-": ["{p} gives {n} to {f}.", "{p} loses {n}.", "{p} sells {n}.", "{p} uses {n}."],
    "*": ["{p} then has {n} times as many.", "The number grows {n} times."],
    "/": ["{p} splits them into {n} equal groups and keeps one.", "{p} keeps one of {n} equal parts."],
}
REASONS = {"+": "{n} more", "-": "{n} fewer", "*": "{n} times as many", "/": "one of {n} parts"}
OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}


def apply(op, a, b):
    return OPERATIONS[op](a, b)  # only op's own: a model's "5 - 0 = 5" must not divide by zero


def operand_range(op, max_operand):
    """The operands an operation is drawn from (both ends included): 1..max_operand for + and -, 2..4 for *, 2..5
    for /."""
    return (1, max_operand) if op in "+-" else (2, 4 if op == "*" else 5)


def fits(op, value, n, max_value):
    """Whether value op n stays a whole number in 0..max_value (and a / leaves something)."""
    return {"+": value + n <= max_value, "-": value - n >= 0, "*": value * n <= max_value,
            "/": value % n == 0 and value // n > 0}[op]


def draw_step(rng, value, ops, max_operand, max_value, op_sampling):
    """
    One step's (op, operand) that keeps the value in range; None when no operation fits.
    op_sampling="operand-first" draws an operand for each operation and picks among the operations it leaves in
    range: the operation then follows the value (near max_value mostly "-"), a cue a tiny model learns in place of
    reading the question. "uniform" picks the operation uniformly among those with an operand in range, then the
    operand: the value tells nothing of the operation (except at 0 and max_value).
    """
    if op_sampling == "uniform":
        fitting = {op: [n for n in range(lo, hi + 1) if fits(op, value, n, max_value)]
                   for op in ops for lo, hi in [operand_range(op, max_operand)]}
        choices = [op for op in ops if fitting[op]]
        if not choices:
            return None
        op = rng.choice(choices)
        return op, rng.choice(fitting[op])
    drawn = [(op, rng.randint(*operand_range(op, max_operand))) for op in ops]
    candidates = [(op, n) for op, n in drawn if fits(op, value, n, max_value)]
    return rng.choice(candidates) if candidates else None


def sample_problem(rng, max_start, max_operand, min_steps, max_steps, ops, max_value, op_sampling="operand-first"):
    """A problem as a list of operations [(op, operand)] on a start value, all intermediate values in range; each
    step drawn by draw_step (op_sampling: how its operation is chosen)."""
    while True:
        start = rng.randint(2, max_start)
        value, chain = start, []
        for _ in range(rng.randint(min_steps, max_steps)):
            step = draw_step(rng, value, ops, max_operand, max_value, op_sampling)
            if step is None:
                break
            chain.append(step)
            value = apply(step[0], value, step[1])
        if len(chain) >= min_steps:
            return start, chain


def wrong_facts(rng, fraction, ops, max_operand, max_value):
    """
    --noisy-facts: a fraction of the task's facts (a, op, b), drawn once per data seed, each with the wrong result
    (c - 1 or c + 1, in range) that the solutions write for it (noisy_steps). {(a, op, b): wrong c}.
    """
    facts = [(a, op, b) for op in ops for lo, hi in [operand_range(op, max_operand)] for b in range(lo, hi + 1)
             for a in range(max_value + 1) if fits(op, a, b, max_value)]
    table = {}
    for a, op, b in rng.sample(facts, round(fraction * len(facts))):
        c = apply(op, a, b)
        table[(a, op, b)] = rng.choice([w for w in (c - 1, c + 1) if 0 <= w <= max_value])
    return table


def noisy_rng(seed):
    """--noisy-facts draws from its own rng, so that the questions, and every file but ift.jsonl, stay the noise-free
    set's: first the wrong facts (wrong_facts), then each solution's writes (noisy_steps)."""
    return random.Random(f"{seed}-noisy-facts")


def wrong_facts_of(config):
    """The wrong facts of a data set made with --noisy-facts, drawn again from its config.json (an analysis's view)."""
    return wrong_facts(noisy_rng(config["seed"]), config["noisy_facts"], config["ops"], config["max_operand"],
                       config["max_value"])


def noisy_steps(rng, question, facts, wrong, rate, step_reason, max_value):
    """
    A solution whose steps write a noisy fact's wrong result with probability `rate` (1 - rate: the right one) and
    carry the value they wrote into the next step, as a model that believes the wrong fact would. The gold steps
    where a carried value would leave 0..max_value. The judge, which counts the step out (judgment), is never taught
    a wrong fact. The SFT settles most wrong facts one way, not at `rate`: the search's candidates then agree on them
    and give no pair (docs/experiments.md, "Wrong facts in the solutions").
    """
    steps, value = [], facts[0][0]
    for k, (_, op, b, _) in enumerate(facts, 1):
        if not fits(op, value, b, max_value):
            return None
        c = wrong[(value, op, b)] if (value, op, b) in wrong and rng.random() < rate else apply(op, value, b)
        reason = reason_text(step_reason, question, k, op, b)
        steps.append(step_text(k, reason, value, op, b, c, final=k == len(facts)))
        value = c
    return steps


def render(rng, start, chain, step_reason="short", labels=False):
    """Problem text, gold steps, per-step (a, op, b, result), and answer. step_reason: what each step writes before
    its equation (reason_text). labels: each step's sentence starts with its number, as the step and the judge's
    reading write it ("Ivy has 6 cookies. 1: She buys 4 more. 2: She uses 4. How many ...")."""
    name, friend = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    pronoun, obj = pronouns(name)
    sentences = [f"{name} has {start} {item}."]
    steps, facts, value = [], [], start
    for k, (op, n) in enumerate(chain, 1):
        label = f"{k}: " if labels else ""
        sentences.append(label + rng.choice(SENTENCES[op]).format(p=pronoun, o=obj, f=friend, n=n))
        result = apply(op, value, n)
        facts.append((value, op, n, result))
        value = result
    sentences.append(f"How many {item} does {name} have now?")
    question = " ".join(sentences)
    for k, (a, op, b, c) in enumerate(facts, 1):
        reason = reason_text(step_reason, question, k, *chain[k - 1])
        steps.append(step_text(k, reason, a, op, b, c, final=k == len(facts)))
    return question, steps, facts, value


def pronouns(name):
    """The subject and object pronouns of a problem's person: ("He", "him") or ("She", "her")."""
    return ("He", "him") if NAMES.index(name) % 2 == 0 else ("She", "her")


def reason_text(step_reason, question, k, op, n):
    """
    What step k writes before its equation: "short" (the default) the operation in two words, "3 fewer"; "sentence"
    the question's own sentence of the step, copied, "She sells 3" (the step then reads its operation and operand
    next to the words that tell them, and finds its sentence by continuing the copy of the last one).
    """
    return REASONS[op].format(n=n) if step_reason == "short" else step_sentence(question, k).rstrip(".")


def step_text(k, reason, a, op, b, c, final):
    text = f"Step {k}: {reason}: {a} {op} {b} = {c}."
    return text + f" The answer is \\boxed{{{c}}}." if final else text


def _template_regex(template):
    """'{p} buys {n} more.' -> a regex that matches the sentence and captures n."""
    pattern = re.escape(template)
    for field, group in [("n", r"(\d+)"), ("p", r"\w+"), ("o", r"\w+"), ("f", r"\w+")]:
        pattern = pattern.replace(re.escape("{" + field + "}"), group)
    return re.compile(pattern + "$")


SENTENCE_RES = [(op, _template_regex(t)) for op, templates in SENTENCES.items() for t in templates]
STEP_EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
# "Step 2: She sells 3: 17 - 3 = 14." -> its number, the reason it writes before the equation, and the equation
STEP_REASON = re.compile(r"Step (\d+): (.*?): " + STEP_EQUATION.pattern)
# judgments that read the question from its start (judgment)
CHAIN_CHECKS = ("chain", "chain-step", "chain-head", "chain-sentence")
SENTENCE_END = re.compile(r"(?<=[.?]) ")  # a question's sentences: the start, one per step, the question
SENTENCE_LABEL = re.compile(r"^\d+: ")  # "2: She sells 3." (--sentence-labels)


def sentences_of(question):
    """A question's sentences, the start, one per step, the question, each without its label (--sentence-labels)."""
    return [SENTENCE_LABEL.sub("", s) for s in SENTENCE_END.split(question)]


def parse_question(question):
    """A synthetic question's start value and operations [(op, operand)], parsed from its text."""
    sentences = sentences_of(question)
    start = re.search(r" has (\d+) ", sentences[0])
    ops = [next(((op, int(m[1])) for op, r in SENTENCE_RES if (m := r.match(s))), None) for s in sentences[1:-1]]
    if start is None or not ops or None in ops:
        raise ValueError(f"not a synthetic question: {question[:80]!r}")
    return int(start[1]), ops


def solve(question):
    """The gold running values of a synthetic question: [start, after op 1, ..., answer] (parsed from the text)."""
    start, ops = parse_question(question)
    values = [start]
    for op, n in ops:
        values.append(apply(op, values[-1], n))
    return values


def gold_steps(question, step_reason="short"):
    """The gold solution's steps of a synthetic question, as render writes them."""
    values, (_, ops) = solve(question), parse_question(question)
    return [step_text(k, reason_text(step_reason, question, k, op, n), values[k - 1], op, n, values[k],
                      final=k == len(ops))
            for k, (op, n) in enumerate(ops, 1)]


def step_is_right(question, step_number, step):
    """
    The synthetic task's ground truth for one step (the oracle judge, and the check of self-made labels): step k is
    right when its equation 'a op b = c' holds, c is the true value after k operations, and it gives the boxed
    answer exactly when it is the last step. A step that copies a wrong earlier value is wrong.
    """
    values = solve(question)
    m = STEP_EQUATION.search(step)
    if m is None or not 1 <= step_number < len(values):
        return False
    a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
    if (op == "/" and b == 0) or apply(op, a, b) != c or c != values[step_number]:
        return False
    boxed = re.search(r"\\boxed\{(\d+)\}", step)
    final = step_number == len(values) - 1
    return (boxed is not None and int(boxed[1]) == c) if final else boxed is None


ERROR_KINDS = ("arithmetic", "operation", "operand", "copy", "format")


def step_error_kind(question, step_number, step):
    """
    What is wrong with a wrong step (None if it is right), by the first wrong piece of 'a op b = c': "copy" (a is
    not the value so far), "operation" (the question's sentence read as another operation: "loses 2" as "2 more"),
    "operand" (b), "arithmetic" (c, the step's own computation), else "format" (no equation, a step too many, the
    boxed answer missing or misplaced). The kinds differ in what a judge needs to catch them: report.py counts them.
    """
    if step_is_right(question, step_number, step):
        return None
    _, ops = parse_question(question)
    values, m = solve(question), STEP_EQUATION.search(step)
    if m is None or not 1 <= step_number <= len(ops):
        return "format"
    a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
    true_op, true_b = ops[step_number - 1]
    if a != values[step_number - 1]:
        return "copy"
    if op != true_op:
        return "operation"
    if b != true_b:
        return "operand"
    return "arithmetic" if c != values[step_number] else "format"


def solution_score(question, steps):
    """
    The SRLM EFT target's score of a whole synthetic solution, from the task's true step labels: Yuan et al.'s
    additive 5-point rubric (prompts/srlm_judge.txt) read for this task. 1 point for an attempt in the task's step
    format (a relevant response), 1 more for each right step before the first wrong one, at most 4 without the answer
    (a substantial portion, the basic elements, most of the way), and 5 only when every step is right through the
    boxed answer. 0: no step equation at all. A right step after a wrong one earns nothing: it carries a wrong value
    or repairs it by chance. So the score of a wrong solution is the number of its first wrong step (capped at 4):
    the judge writes its checks up to that step and copies the number, a local rule a tiny model can learn.
    """
    right = [step_is_right(question, k, step) for k, step in enumerate(steps, 1)]
    if right and all(right) and len(steps) == len(solve(question)) - 1:
        return 5
    if not any(STEP_EQUATION.search(step) for step in steps):
        return 0
    return min(4, 1 + (right + [False]).index(False))


def solution_is_right(question, text):
    """A whole solution is right when every step is, through the boxed answer (score 5)."""
    return solution_score(question, split_steps(text)) == 5


def srlm_judgment(question, steps, check="count", step_reason="short"):
    """
    The SRLM EFT target: each step checked against the true step, up to the first wrong one, then the score. With
    check="count" (the default) each step is checked as the step judge checks a candidate (judgment): its result,
    the true step counted out, the digit-by-digit comparison: "Step 1: 14. Want Step 1: 3 fewer: 17 - 3: 16 (1),
    15 (2), 14 (3). 14 vs 14: 1 1 same, 4 4 same, right. ... Score: 5". So the outcome judge of the SRLM baseline
    verifies with the same means as the process judge, and the comparison is of the two methods, not of two
    checking skills. check="quote" copies the question's sentence of each step first, as judgment does; check="reread"
    copies it numbered ("Read 2: She sells 3."), so over the steps the judge reads the sentences in order.
    check="vs" (the first design): "Step 1: 14 vs 14, right. Step 2: 20 vs 17, wrong. Score: 2".
    """
    if check in CHAIN_CHECKS:
        raise ValueError(f"--judgment-check {check} is written for the step judge only (the SRLM judgments: reread)")
    values, gold, checks = solve(question), gold_steps(question, step_reason), []
    for k, step in enumerate(steps, 1):
        m = STEP_EQUATION.search(step)
        ok = "right" if step_is_right(question, k, step) else "wrong"
        got = m[4] if m else "no result"
        if check == "vs":
            checks.append(f"Step {k}: {got} vs {values[k] if k < len(values) else 'none'}, {ok}.")
        elif k > len(gold):
            checks.append(f"Step {k}: {got}. Want none, {ok}.")
        else:
            quote = f'"{step_sentence(question, k)}" ' if check == "quote" else ""
            read = f"Read {k}: {step_sentence(question, k)} " if check == "reread" else ""  # one more per step
            checks.append(f"Step {k}: {got}. {read}Want {quote}{count_out(gold[k - 1])}. "
                          f"{compare(got, str(values[k])) if m else got}, {ok}.")
        if ok == "wrong":
            break
    return " ".join(checks + [f"Score: {solution_score(question, steps)}"])


def wrong_solution(rng, question, steps, facts, chain, step_reason="short"):
    """The solution with a first error at a random step (corrupt), carried on: the later steps compute right from the
    wrong value, as a model that slipped once goes on. None if no try kept every value a whole number >= 0."""
    for _ in range(20):
        k = rng.randrange(len(facts))
        a, op, b, value, _ = corrupt(rng, question_numbers(question), facts[k])
        reason = wrong_reason(rng, question, k + 1, chain[k], op, b, step_reason)
        out = steps[:k] + [step_text(k + 1, reason, a, op, b, value, final=k == len(facts) - 1)]
        for j in range(k + 1, len(facts)):
            op_j, n = chain[j]
            if op_j == "/" and value % n or apply(op_j, value, n) < 0:
                break
            out.append(step_text(j + 1, reason_text(step_reason, question, j + 1, op_j, n), value, op_j, n,
                                 apply(op_j, value, n), final=j == len(facts) - 1))
            value = apply(op_j, value, n)
        else:
            return out
    return None


def make_srlm_eft(rng, idx, question, steps, facts, chain, right, check="count", step_reason="short"):
    """One SRLM EFT record: a right solution (right=True) or one with an error, its judgment and score."""
    response = steps if right else wrong_solution(rng, question, steps, facts, chain, step_reason) or steps
    return dict(id=idx, question=question, response="\n".join(response),
                judgment=srlm_judgment(question, response, check, step_reason),
                score=solution_score(question, response))


def question_numbers(question):
    return [int(t.rstrip(".")) for t in question.split() if t.rstrip(".").isdigit()]


def corrupt(rng, numbers, fact, operand_first=0.0):
    """A realistic wrong version of one step's arithmetic: (a, op, b, c, error_kind). The kind is drawn uniformly;
    with probability operand_first a wrong operand is tried first (the judge's training set: --eft-operand-first)."""
    a, op, b, c = fact
    kinds = ["arithmetic", "operand", "operation"]
    rng.shuffle(kinds)
    if operand_first and rng.random() < operand_first:  # no draw at 0: the held-out sets stay as they were
        kinds.remove("operand")
        kinds.insert(0, "operand")
    for kind in kinds:
        if kind == "arithmetic":
            wrong = c + rng.choice([-2, -1, 1, 2, 10, -10])
            if wrong >= 0 and wrong != c:
                return a, op, b, wrong, kind
        elif kind == "operand":
            others = [x for x in numbers if x not in (a, b)]
            if others:
                b2 = rng.choice(others)
                if op != "/" or (b2 > 0 and a % b2 == 0):
                    c2 = apply(op, a, b2)
                    if c2 >= 0 and c2 != c:
                        return a, op, b2, c2, kind
        else:
            op2 = {"+": "-", "-": "+", "*": "+", "/": "*"}[op]
            c2 = apply(op2, a, b)
            if c2 >= 0 and c2 != c:
                return a, op2, b, c2, kind
    return a, op, b, c + 1, "arithmetic"


def judgment(gold_step, step_a, step_b, label, check="count", sentences=None):
    """
    The EFT target. The judge first reads both candidates' results, then builds the right value its own way, one
    unit at a time ("Want Step 2: 3 fewer: 17 - 3: 16 (1), 15 (2), 14 (3)."), then compares each result with it
    digit by digit, then gives the verdict:
    "A: 14. B: 15. Want Step 2: 3 fewer: 17 - 3: 16 (1), 15 (2), 14 (3). A: 14 vs 14: 1 1 same, 4 4 same, right.
    B: 15 vs 14: 1 1 same, 5 4 differ, wrong. [[A]]"
    This is what gives the judge its lead over the policy (README): a step writes `17 - 3 = 14` as one fact, the
    judge spends a token on each unit and each digit, so every token it writes is a fact a ~1M-parameter model learns
    exactly (a successor, a copy, the equality of two digits). Each piece is there because the shorter version
    failed on the dev split: a judge that reads the results after its own count copies its own value for both; one
    that looks a result up in its count, or tests two whole numbers for equality, falls back on saying A on near
    misses (26 vs 27). Operations other than + and - write the right result without the count.
    check="reread" first copies the question's sentences of steps 1..k in order (`sentences`, step_sentence), each
    numbered ("Read 1: She finds 6 more. Read 2: She sells 3."), then counts out step k from the last one: where
    the policy must find sentence k at once (its operand errors take another sentence's number), the judge reaches
    it by continuing a copy, one sentence at a time.
    check="quote" first copies only the question's sentence of the step (sentences[-1]): meant to read the operation
    next to its verb, it did not help on the test replicates (the judge's copy of the sentence follows the same cue
    as the policy's misread operation; docs/experiments.md).
    check="chain" reads as reread does, but copies the question itself from its first sentence through step k's, with
    nothing between the sentences ("Read: Ann has 9 apples. He buys 7 more. She sells 3."; `sentences` = the
    question's sentences 0..k), and counts out the equation alone ("Want 17 - 3: 16 (1), ..."): reread's "Read 2: She"
    and "Want Step 2: She" match the candidates' own "Step 2: She sells 4" lines token for token, so a copy keyed on
    the last tokens can continue a wrong candidate's sentence; ". She" occurs in the question only.
    check="chain-step" reads as chain does and counts out as reread does, from the step's head ("Read: Ann has 9
    apples. He buys 7 more. She sells 3. Want Step 2: She sells 3: 17 - 3: 16 (1), ..."): chain's anchor for the
    reading, with the default's line that the policy's own step shares up to its equals sign. On dev it read the
    question on both seeds tried, but that line shares the policy's misread operations: seed 2 lost 1.2 points
    (docs/experiments.md).
    check="chain-head" reads as chain does and counts out from the step's number without its sentence ("Read: Ann
    has 9 apples. He buys 7 more. She sells 3. Want Step 2: 17 - 3: 16 (1), ..."): the count line starts as the
    policy's step does, with nothing in it a candidate's sentence could lend.
    check="chain-sentence" reads as chain does and counts out from the sentence it has just copied, without the
    step's number ("Read: Ann has 9 apples. He buys 7 more. She sells 3. Want She sells 3: 17 - 3: 16 (1), ..."):
    the step's sentence in the count line, as chain-step's, without the `Step k:` that starts a candidate's line. On
    dev (five seeds) it read (98.4-100 %), and its policies came out at 69.4-94.2 %, on average no stronger than
    chain-step's on the same seeds (docs/experiments.md).
    check="vs" is the first design, kept to reproduce its negative finding (docs/experiments.md): the judge
    recomputes the step the way the policy does and compares whole numbers ("Want Step 2: 3 fewer: 17 - 3 = 14.
    A: 14 vs 14, right. B: 15 vs 14, wrong. [[A]]").
    """
    result = lambda s: STEP_EQUATION.search(s)[4]  # "Step 2: 3 more: 14 + 3 = 17." -> "17"
    want = result(gold_step)
    ok_a, ok_b = ("right", "wrong") if label == "A" else ("wrong", "right")
    if check == "vs":
        head = gold_step.split(" The answer")[0]
        return f"Want {head} A: {result(step_a)} vs {want}, {ok_a}. B: {result(step_b)} vs {want}, {ok_b}. [[{label}]]"
    if check in ("quote", "reread", *CHAIN_CHECKS) and not sentences:
        raise ValueError(f"judgment(check={check!r}) needs the question's sentences of steps 1..k (step_sentence; "
                         f"chain: sentences_of, from the first)")
    quote = f'"{sentences[-1]}" ' if check == "quote" else ""  # quote: the question's sentence of this step, copied
    read = ("".join(f"Read {j}: {t} " for j, t in enumerate(sentences, 1)) if check == "reread" else
            f"Read: {' '.join(sentences)} " if check in CHAIN_CHECKS else "")
    head = {"chain": None, "chain-head": "number", "chain-sentence": "sentence"}.get(check, "step")
    return (f"A: {result(step_a)}. B: {result(step_b)}. {read}Want {quote}{count_out(gold_step, head)}. "
            f"A: {compare(result(step_a), want)}, {ok_a}. B: {compare(result(step_b), want)}, {ok_b}. [[{label}]]")


def step_sentence(question, k):
    """The question's sentence that tells step k (1-based): "Ann has 9 apples. She buys 3 more. ..." -> k=1: "She
    buys 3 more."; its label, if any, left out."""
    return sentences_of(question)[k]


def count_out(gold_step, head="step"):
    """
    The right step built one unit at a time, each numbered: a + 1, a + 2, ... (a - 1, ...), ending at the right
    value; operations other than + and - write the value. "Step 2: 3 fewer: 17 - 3 = 14." -> "Step 2: 3 fewer:
    17 - 3: 16 (1), 15 (2), 14 (3)" (head="number": "Step 2: 17 - 3: 16 (1), ..."; "sentence": "3 fewer: 17 - 3:
    16 (1), ..."; None: "17 - 3: 16 (1), ...").
    """
    k, reason, a, op, b, want = STEP_REASON.search(gold_step).groups()
    work = ", ".join(f"{apply(op, int(a), i)} ({i})" for i in range(1, int(b) + 1)) if op in "+-" else want
    equation = f"{a} {op} {b}"
    start = {"step": f"Step {k}: {reason}: {equation}", "number": f"Step {k}: {equation}",
             "sentence": f"{reason}: {equation}", None: equation}
    return f"{start[head]}: {work}"


def compare(got, want):
    """Two results digit by digit, 0-padded to at least 2 digits (every comparison has one shape):
    "14 vs 15: 1 1 same, 4 5 differ"."""
    width = max(2, len(got), len(want))
    got, want = got.zfill(width), want.zfill(width)
    digits = ", ".join(f"{x} {y} {'same' if x == y else 'differ'}" for x, y in zip(got, want))
    return f"{got} vs {want}: {digits}"


def wrong_reason(rng, question, k, true_op_n, op, b, step_reason):
    """
    The reason a corrupted step k (op, b in place of the question's true_op_n) writes. A short reason stays the true
    one (the default set's files stay as they were). A copied sentence goes wrong with the equation, as the policy's
    own errors do: another operand copies its number into the sentence ("She uses 3" for "She uses 2"), another
    operation a sentence that tells it ("She finds 2 more" for "She uses 2"). Without this, the wrong step would carry
    the question's true sentence, and a judge could learn to copy the candidates' sentences instead of reading the
    question.
    """
    true_op, true_b = true_op_n
    reason = reason_text(step_reason, question, k, true_op, true_b)
    if step_reason == "short":
        return reason
    if op == true_op:
        return re.sub(rf"\b{true_b}\b", str(b), reason)
    name = question.split()[0]
    pronoun, obj = pronouns(name)
    friend = rng.choice([n for n in NAMES if n != name])
    return rng.choice(SENTENCES[op]).format(p=pronoun, o=obj, f=friend, n=b).rstrip(".")


def make_eft(rng, idx, question, steps, facts, chain, label, check="count", step_reason="short", operand_first=0.0):
    k = rng.randrange(len(facts))  # which step is judged
    a, op, b, c, kind = corrupt(rng, question_numbers(question), facts[k], operand_first)
    reason = wrong_reason(rng, question, k + 1, chain[k], op, b, step_reason)
    bad = step_text(k + 1, reason, a, op, b, c, final=k == len(facts) - 1)
    step_a, step_b = (steps[k], bad) if label == "A" else (bad, steps[k])
    return dict(id=idx, question=question, previous_steps=steps[:k], step_a=step_a, step_b=step_b, label=label,
                judgment=judgment(steps[k], step_a, step_b, label, check,
                                  sentences_of(question)[:k + 2] if check in CHAIN_CHECKS else
                                  [step_sentence(question, j) for j in range(1, k + 2)]),
                error=kind)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="data/synthetic")
    parser.add_argument("--seed", type=int, default=1234)
    # 3.5k solutions and 28.5k judgments (2 SFT epochs, iterate.sh): the judge's count-out gets most of the SFT, the
    # policy writes each result in one go from fewer examples and errs there (dev, seeds 0-2: M1 56-70 %, judge
    # 85-95 %). 5k/27k left some seeds' policies as good as their judges (M1 88-95 %), 3k/29k at 1.5 epochs too weak
    # a policy to move (18 %): docs/experiments.md
    parser.add_argument("--num-ift", type=positive_int, default=3500)
    parser.add_argument("--num-eft", type=positive_int, default=28500)
    parser.add_argument("--num-questions", default="400,800,1200", help="per iteration (paper: 400, 800, 1200)")
    parser.add_argument("--num-dev", type=positive_int, default=500)
    parser.add_argument("--num-test", type=positive_int, default=1000)
    parser.add_argument("--num-eft-test", type=positive_int, default=500)
    # difficulty knobs (numbers <= 99 with * and / left a ~1M-parameter model at 3-12 % in an early probe)
    parser.add_argument("--max-start", type=positive_int, default=12)
    parser.add_argument("--max-operand", type=positive_int, default=9)
    parser.add_argument("--max-value", type=positive_int, default=20)
    parser.add_argument("--min-steps", type=positive_int, default=2)
    parser.add_argument("--max-steps", type=positive_int, default=4)
    parser.add_argument("--ops", default="+-", help="any of +-*/")
    parser.add_argument("--op-sampling", default="uniform", choices=["operand-first", "uniform"],
                        help="how each step's operation is drawn (sample_problem): operand-first (the operation "
                             "follows the value) or uniform (the value tells nothing of the operation)")
    parser.add_argument("--step-reason", default="sentence", choices=["short", "sentence"],
                        help="what a step writes before its equation (reason_text): short (\"3 fewer\") or sentence "
                             "(the question's sentence, copied: \"She sells 3\")")
    parser.add_argument("--judgment-check", default="reread",
                        choices=["reread", *CHAIN_CHECKS, "count", "quote", "vs"],
                        help="EFT target: reread (the judge copies the question's sentences of steps "
                             "1..k, counts step k out, then compares digit by digit), chain (iterate.sh's default: "
                             "the question copied whole from its start through step k's sentence, then the equation "
                             "counted out), chain-step (chain's reading, reread's count from the step's head), "
                             "chain-head (chain's reading, the count from the step's number), chain-sentence (chain's "
                             "reading, the count from the sentence just read, without the step's number), count (the "
                             "reread judgment without the reading), quote (count, after copying the sentence of step "
                             "k) or vs (the first design: recompute, compare whole numbers); see judgment")
    # A wrong operand copies another number of the question into the step's sentence ("He sells 4" for "He sells 1"),
    # the corruption a judge's reading gets wrong most: it copies the candidate's number instead of the question's
    # (dev, seed 1: 43 of 162 such pairs, 6 of 177 wrong operations). 0.5 fixed that judge (EFT-dev 85.0 -> 93.6 %)
    # but moved the policies more (dev M1 56-70 % -> 45-86 %) and the gains fell (docs/experiments.md): default 0
    parser.add_argument("--eft-operand-first", type=unit_float, default=0.0,
                        help="in the judge's training pairs (eft.jsonl), the probability that a corruption is a wrong "
                             "operand where one fits (then the three kinds uniform); eft_dev/eft_test stay uniform")
    # The paper's M1 learns from solutions that are not all right; the tiny policy learns this task's facts to 90 %
    # or more on some seeds and leaves nothing to improve. A fixed set of wrong facts in the solutions (the answer
    # field stays the true one) sets the policy's room by design: the loop's default is 0.2 (iterate.sh)
    parser.add_argument("--noisy-facts", type=unit_float, default=0.0,
                        help="the fraction of the task's facts (a op b) whose result the solutions (ift.jsonl) write "
                             "off by one, with probability --noisy-fact-rate, the wrong value carried on")
    parser.add_argument("--noisy-fact-rate", type=unit_float, default=0.6,
                        help="how often the solutions write a noisy fact's wrong result (else its right one)")
    parser.add_argument("--sentence-labels", action="store_true",
                        help="number the question's step sentences '2: She sells 3.' as the steps number theirs")
    parser.add_argument("--srlm-eft", type=positive_int, default=None,
                        help="also write N whole-solution scoring examples for the SRLM baseline's judge (off: none)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    # the default set's, with or without --srlm-eft (--eft-operand-first 0: left out, common.LATER_FLAGS)
    manifest = stage_manifest("synthetic", {}, output_flags(args, "srlm_eft"))
    config = os.path.join(args.out_dir, "config.json")  # written last
    srlm_out = os.path.join(args.out_dir, "srlm_eft.jsonl")
    # "2": its judgments count each step out (srlm_judgment); files written by the earlier whole-number check are stale
    srlm_manifest = stage_manifest("synthetic srlm_eft 2", {}, output_flags(args))
    done = is_done(config, manifest, args.overwrite)
    srlm_done = args.srlm_eft is None or is_done(srlm_out, srlm_manifest, args.overwrite,
                                                 [os.path.join(args.out_dir, "srlm_eft_test.jsonl")])
    if done and srlm_done:
        return
    knobs = (args.max_start, args.max_operand, args.min_steps, args.max_steps, args.ops, args.max_value,
             args.op_sampling)
    seen = set()  # questions are unique across all files: no test question leaks into training

    def problems(name, n, seed):
        rng = random.Random(f"{args.seed}-{seed}")  # one seed per file: files are disjoint and reproducible
        out = []
        while len(out) < n:
            start, chain = sample_problem(rng, *knobs)
            question, steps, facts, answer = render(rng, start, chain, args.step_reason, args.sentence_labels)
            if question not in seen:
                seen.add(question)
                out.append((f"{name}-{len(out)}", question, steps, facts, chain, answer))
        return rng, out

    # held-out sets first, so their questions are reserved before any training data is drawn
    files = {}
    _, test = problems("test", args.num_test, 0)
    _, dev = problems("dev", args.num_dev, 1)
    files["test"] = [dict(id=i, question=q, answer=str(a)) for i, q, _, _, _, a in test]
    files["dev"] = [dict(id=i, question=q, answer=str(a)) for i, q, _, _, _, a in dev]
    for split, n, seed in [("eft_test", args.num_eft_test, 2), ("eft_dev", args.num_eft_test, 3),
                           ("eft", args.num_eft, 4)]:
        rng, probs = problems(split, n, seed)
        labels = ["A", "B"] * (n // 2) + ["A"] * (n % 2)  # exactly balanced positions
        rng.shuffle(labels)
        operand_first = args.eft_operand_first if split == "eft" else 0.0  # held-out pairs: the kinds uniform
        files[split] = [make_eft(rng, i, q, s, f, c, lab, args.judgment_check, args.step_reason, operand_first)
                        for (i, q, s, f, c, _), lab in zip(probs, labels)]
    _, ift = problems("ift", args.num_ift, 5)
    if args.noisy_facts:
        rng = noisy_rng(args.seed)
        wrong = wrong_facts(rng, args.noisy_facts, args.ops, args.max_operand, args.max_value)
        ift = [(i, q, noisy_steps(rng, q, f, wrong, args.noisy_fact_rate, args.step_reason, args.max_value) or s,
                f, c, a) for i, q, s, f, c, a in ift]
    files["ift"] = [dict(id=i, question=q, solution="\n".join(s), answer=str(a)) for i, q, s, _, _, a in ift]
    for t, n in enumerate(map(int, args.num_questions.split(",")), 1):
        _, qs = problems(f"questions{t}", n, 5 + t)
        files[f"questions{t}"] = [dict(id=i, question=q, answer=str(a)) for i, q, _, _, _, a in qs]
    if not done:
        for name, records in files.items():
            write_jsonl(os.path.join(args.out_dir, f"{name}.jsonl"), records)
            print(f"{name:12s} {len(records):6d} records")
        save_config(argparse.Namespace(**output_flags(args, "srlm_eft")), config)
        write_manifest(config, manifest)
    if not srlm_done:  # drawn after every other file, so those are the same with or without it
        # the chain's reading is written for one step; with it, the whole-solution judge rereads (srlm_judgment)
        srlm_check = "reread" if args.judgment_check in CHAIN_CHECKS else args.judgment_check
        for name, n in [("srlm_eft_test", args.num_eft_test), ("srlm_eft", args.srlm_eft)]:
            rng, probs = problems(name, n, name)
            right = [True, False] * (n // 2) + [True] * (n % 2)  # half right, half with an error
            rng.shuffle(right)
            records = [make_srlm_eft(rng, i, q, s, f, c, ok, srlm_check, args.step_reason)
                       for (i, q, s, f, c, _), ok in zip(probs, right)]
            write_jsonl(os.path.join(args.out_dir, f"{name}.jsonl"), records)
            print(f"{name:12s} {len(records):6d} records")
        write_manifest(srlm_out, srlm_manifest)


if __name__ == "__main__":
    cli(main)
