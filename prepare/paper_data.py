"""
Data for M1 (paper §2): IFT solutions written as `Step n: ` steps, and EFT step-pair judgments.

The paper's IFT data is 28,889 NuminaMath-CoT solutions that o1 split into steps without changing their content
(Figure 3 prompt); its EFT data is 4,167 pairs of best/worst steps found by a PRM-guided tree search, each with an
o1-written judgment, kept only if o1 agrees with the PRM and gives the same verdict with A/B swapped. Our stand-ins:

IFT  reference solutions of MATH train and GSM8K train (and NuminaMath-CoT with `--numina N` when the hub is
     reachable), split by a RULE-BASED splitter that only cuts the text, never edits it:
       - pieces end at sentence ends (". ! ?", also a period closing a maths span as in "$x=2.$ Then"; not after
         "e.g."/"i.e."/..., not after a list number "1.", not before a lowercase letter), after an [asy] figure,
         and at blank lines (GSM8K: at every line end);
       - nothing is cut inside $...$, $$...$$, \\[...\\], \\(...\\), \\begin{env}...\\end{env} or [asy]...[/asy];
         3.5 is never cut (a cut needs whitespace or the end of a display block after the period);
       - pieces shorter than --min-step-chars are merged into the next piece (the last one into the previous);
       - each step gets the prefix "Step n: ".
     Content invariant (`same_content`, tested): the steps with their "Step n: " prefixes removed, each step's
     whitespace runs collapsed to one space, joined with one space or with nothing at each step boundary, equal the
     original text with its whitespace runs collapsed to one space and stripped. (The rule-based split is stronger
     still: its pieces are slices that concatenate to the original exactly.)
     GSM8K: the calculator annotations `<<48/2=24>>` are removed (they are tool calls for the GSM8K paper's
     calculator, not natural text; `--keep-calculator` keeps them) and the final `#### N` becomes a last step
     "The answer is \\boxed{N}." -- both edit the reference text on purpose; the invariant is checked on the text
     after these two edits. MATH solutions already end with \\boxed{}.
     `--splitter model --splitter-model DIR` asks a model to split with the paper's Figure 3 prompt
     (prompts/segment.txt); an output whose content differs from the original (same check as above), or whose
     markers are not "Step 1:", "Step 2:", ... in order, is rejected and the rule-based split is used instead; the
     number of fallbacks is printed.
EFT  pairs from PRM800K-format step ratings: at the same prefix (same problem, same earlier steps), a step rated +1
     and a step rated -1 form a pair (every +1 x -1 combination, or at most --max-pairs-per-prefix of them); rating 0
     and null (human-written) steps are not used. Identical step texts at a prefix are merged; a text rated both +1
     and -1 there is dropped. Label positions are balanced: exactly half the pairs (rounded up) have the +1 step
     as A, chosen by --seed. The judgment is
       - without a model, a TEMPLATE, not an explanation: "Assistant A's step is correct. Assistant B's step
         contains an error. [[A]]" (or the mirror for B) -- deviation: the paper's judgments are o1 explanations;
       - with --explainer-model DIR, that model's greedy answer to the judge prompt (prompts/judge.txt, through
         modeling.judge_pairs), cut after its verdict; the paper's two filters apply: the verdict must agree with the label (filter 1) and the verdict with
         A/B swapped must agree too (filter 2); counts kept/dropped per filter are printed. A/B positions are
         re-balanced over the kept pairs (both orders were judged correctly, so either judgment is valid).

!!! CONTAMINATION: the PRM800K sample shipped here (phase1_test, 101 problems) is made of MATH-500 problems, the
!!! test set on which MATH accuracy is reported. EFT data from it puts test problems (and rated solution steps for
!!! them) into M1's training data. The overlap with --test-set is counted and printed at every run; nothing is
!!! excluded unless you pass --exclude-test-problems (which then prints how many records it dropped).

Reads
  MATH train JSONL     {problem, solution, ...}             (--math)
  GSM8K train JSONL    {question, answer}                   (--gsm8k; answer ends with "#### N")
  PRM800K-format JSONL {instruction, responses: [str] (earlier chosen steps), next_response, rating: 1|0|-1|null}
Writes
  --out-ift  {id, source, question, solution: "Step 1: ...\\nStep 2: ...", answer}   answer: final answer or null
  --out-eft  {id, source, question, previous_steps: ["Step 1: ..."], step_a: "Step k: ...", step_b: "Step k: ...",
              label: "A"|"B", judgment: "... [[A]]"}
  in a random order fixed by --seed (so that any first N records mix sources and problems), the resolved flags next
  to each (<out>.config.json) and, written last, what made it (<out>.manifest.json: inputs by content, flags; a rerun
  skips an output only when they match).

  python -m prepare.paper_data --math data/math/train.jsonl --gsm8k data/gsm8k/train.jsonl \\
      --prm800k data/prm800k/phase1_test_stepwise_critique.jsonl \\
      --out-ift data/sft/ift.jsonl --out-eft data/sft/eft.jsonl
The paper preset's whole data set (iteration questions, IFT, EFT and its held-out test split) in one command, from
the hub (each set by name through datasets.load_dataset, copied to data/real/hub/ first) or from a local folder of
the same JSONL files:
  python -m prepare.paper_data --source hub --out-dir data/real
  python -m prepare.paper_data --source DIR --out-dir data/real
"""

import argparse
import collections
import hashlib
import os
import random
import re
import statistics

from common import (VERDICT, DataError, chat_prompt, cli, is_done, join_steps, judge_context, last_boxed, load_prompt,
                    output_flags, prompt_path, read_jsonl, save_config, split_steps, stage_manifest, write_jsonl,
                    write_manifest)
from modeling import generate, judge_pairs, load_model

# ----------------------------------------------------------------------------------------------------------------
# rule-based splitter: find the spans that must not be cut, then the cut points, then group pieces into steps

DISPLAY_DELIMITERS = [("[asy]", "[/asy]"), ("$$", "$$"), ("\\[", "\\]")]
INLINE_DELIMITERS = [("\\(", "\\)"), ("$", "$")]
BEGIN = re.compile(r"\\begin\{([^{}]*)\}")
ABBREVIATION = re.compile(r"\b(?:e\.g|i\.e|etc|vs|cf|approx|resp|Dr|Mr|Mrs|Ms|St|Fig|Eq|No)\.$", re.IGNORECASE)
LIST_NUMBER = re.compile(r"[ \t]*\d{1,3}\.")
BLANK_LINE = re.compile(r"\n[ \t]*\n")
CLOSING_PUNCTUATION = "\"')]*"  # a sentence may end with ." or .) or .** (markdown bold)


def find_closer(text, start, closer, env=None):
    """Index of the delimiter that closes a span opened just before `start`, or -1. A backslash escapes the next
    character (\\$ is a dollar sign, \\\\ a line break), and \\begin{env} ... \\end{env} nest."""
    depth, j = 1, start
    while j < len(text):
        if env and text.startswith(f"\\begin{{{env}}}", j):
            depth += 1
        elif text.startswith(closer, j):
            depth -= 1
            if depth == 0:
                return j
        j += 2 if text[j] == "\\" and not text.startswith(closer, j) else 1
    return -1


def span_at(text, i, dollar_math):
    """The protected span opening at i as (start, end, ends_sentence, display), or None. ends_sentence: its
    content ends with a period, as MATH often writes it ("$x=2.$ Then", "\\begin{align*} ... y=2.\\end{align*}")."""
    begin = BEGIN.match(text, i)
    if begin:
        delimiters = [(begin.group(0), f"\\end{{{begin.group(1)}}}", True, begin.group(1))]
    else:
        delimiters = [(o, c, True, None) for o, c in DISPLAY_DELIMITERS] + \
                     [(o, c, False, None) for o, c in INLINE_DELIMITERS if dollar_math or o != "$"]
    for opener, closer, display, env in delimiters:
        if text.startswith(opener, i):
            j = find_closer(text, i + len(opener), closer, env)
            if j < 0 or (not display and BLANK_LINE.search(text, i, j)):
                return None  # unclosed (or an inline span across a paragraph): the opener is plain text
            inner = text[i + len(opener):j].rstrip(" \t\n\\")
            return i, j + len(closer), inner.endswith(".") or opener == "[asy]", display  # a figure is whole
    return None


def protected_spans(text, dollar_math=True):
    """
    Every maths/figure span the splitter must not cut, left to right. dollar_math=False: '$' is money, never a
    delimiter (GSM8K's "$12").
    """
    spans, i = [], 0
    while i < len(text):
        if text.startswith(("\\\\", "\\$"), i):  # a LaTeX line break or an escaped dollar, not an opener
            i += 2
            continue
        span = span_at(text, i, dollar_math)
        spans += [span] if span else []
        i = span[1] if span else i + 1
    return spans


def ends_sentence(text, p, span_ending_at):
    """Does a sentence end right before position p (p is not inside a protected span)?"""
    if p in span_ending_at:
        return span_ending_at[p]
    before = text[:p].rstrip(CLOSING_PUNCTUATION)
    if not before or before[-1] not in ".!?":
        return False
    line = before[before.rfind("\n") + 1:]
    return not ABBREVIATION.search(before[-12:]) and not LIST_NUMBER.fullmatch(line)


def split_pieces(text, dollar_math=True, lines=False):
    """
    The text cut into pieces that concatenate back to it exactly (each piece keeps its trailing whitespace).
    Cuts: at blank lines, (lines=True) at every newline, after a sentence end followed by whitespace (a period
    inside maths counts), and after a display block ending a sentence even with no whitespace after it. Never
    inside a protected span, never before [asy] (a figure stays with the sentence before it), and a sentence end is
    no cut before a lowercase letter (a sentence does not start with one; this also keeps "approx. value" whole).
    """
    spans = protected_spans(text, dollar_math)
    inside = bytearray(len(text))
    for a, b, _, _ in spans:
        inside[a:b] = b"\x01" * (b - a)
    span_ending_at = {b: ends for _, b, ends, _ in spans}
    line_cuts, sentence_cuts = set(), set()
    for m in re.finditer(r"\s+", text):
        if inside[m.start()] or m.start() == 0 or m.end() == len(text):
            continue
        if BLANK_LINE.search(m.group()) or (lines and "\n" in m.group()):
            line_cuts.add(m.end())
        elif ends_sentence(text, m.start(), span_ending_at):
            sentence_cuts.add(m.end())
    for a, b, ends, display in spans:  # "...\\]Find": a display block ending a sentence, text glued to it
        if ends and display and b < len(text) and not text[b].isspace() and not inside[b]:
            sentence_cuts.add(b)
    cuts = line_cuts | {c for c in sentence_cuts if not text[c].islower()}
    cuts = sorted(c for c in cuts if not text.startswith("[asy]", c))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def group_pieces(pieces, min_chars):
    """Pieces -> steps (still exact slices): a piece shorter than min_chars joins the next; a short tail the last."""
    steps, buffer = [], ""
    for piece in pieces:
        buffer += piece
        if len(buffer.strip()) >= min_chars:
            steps.append(buffer)
            buffer = ""
    if buffer:
        steps[-1:] = [steps[-1] + buffer] if steps else [buffer]
    return steps


def number_steps(contents):
    return [f"Step {n}: {c.strip()}" for n, c in enumerate(contents, 1)]


def rule_split(text, min_chars, dollar_math=True, lines=False):
    """A solution text -> its step contents (no markers yet), cut by the rules above."""
    return [s.strip() for s in group_pieces(split_pieces(text, dollar_math, lines), min_chars) if s.strip()]


# ----------------------------------------------------------------------------------------------------------------
# content invariant: a split may move whitespace, nothing else

STEP_MARKER = r"Step\s*{n}\s*:\s*"


def collapse_whitespace(text):
    return re.sub(r"\s+", " ", text).strip()


def strip_markers(steps):
    """['Step 1: a', 'Step 2: b'] -> ['a', 'b']; None if the markers are not Step 1, Step 2, ... in order."""
    contents = []
    for n, step in enumerate(steps, 1):
        m = re.match(STEP_MARKER.format(n=n), step.strip())
        if not m:
            return None
        contents.append(step.strip()[m.end():])
    return contents


def same_content(original, contents):
    """
    The definition of "content unchanged": collapse(original) == the collapsed contents joined with " " or ""
    at each boundary (a step may start where the original had no space, as in "\\]Find"). No empty step.
    """
    target, pos = collapse_whitespace(original), 0
    for c in map(collapse_whitespace, contents):
        if not c:
            return False
        if target.startswith(" " + c, pos):
            pos += 1
        elif not target.startswith(c, pos):
            return False
        pos += len(c)
    return pos == len(target)


def parse_model_split(text):
    """A splitter model's output -> step contents, or None (preamble before 'Step 1:', misnumbered markers)."""
    steps = split_steps(text)
    return strip_markers(steps) if steps else None


# ----------------------------------------------------------------------------------------------------------------
# IFT sources


CALCULATOR = re.compile(r"<<[^<>]*>>")
GSM8K_ANSWER = re.compile(r"\n?####\s*(.+?)\s*$")


def gsm8k_body(answer, keep_calculator=False):
    """GSM8K `answer` -> (solution text without '#### N', N). Calculator annotations removed unless kept."""
    m = GSM8K_ANSWER.search(answer)
    if not m:
        raise ValueError("no '#### N' line")
    body = answer[:m.start()]
    return (body if keep_calculator else CALCULATOR.sub("", body)), m.group(1)


def ift_items(args):
    """(id, source, question, text to split, extra final step or None, answer, dollar_math, lines) per solution."""
    items = []
    if args.math:
        for i, r in enumerate(read_jsonl(args.math, ["problem", "solution"])[:args.limit]):
            items.append((f"math:{r.get('unique_id', i)}", "math", r["problem"], r["solution"], None,
                          last_boxed(r["solution"]), True, False))
    if args.gsm8k:
        for i, r in enumerate(read_jsonl(args.gsm8k, ["question", "answer"])[:args.limit]):
            try:
                body, answer = gsm8k_body(r["answer"], args.keep_calculator)
            except ValueError as e:
                raise DataError(f"{args.gsm8k}:{i + 1}: {e}") from None
            # GSM8K's '$' is money, and every line is one calculation: cut at every line end
            items.append((f"gsm8k:train:{i}", "gsm8k", r["question"], body, f"The answer is \\boxed{{{answer}}}.",
                          answer, False, True))
    if args.numina:
        for i, r in enumerate(load_numina(args.numina_dataset, args.numina)):
            items.append((f"numina:{i}", "numina", r["problem"], r["solution"], None, last_boxed(r["solution"]),
                          True, False))
    return items


def load_numina(name, n):
    """The first n NuminaMath-CoT training examples (paper §2's IFT source), streamed from the hub."""
    try:
        import datasets
        stream = datasets.load_dataset(name, split="train", streaming=True)
        return [{"problem": r["problem"], "solution": r["solution"]} for r, _ in zip(stream, range(n))]
    except Exception as e:  # no network, no hub, no `datasets`: all end here
        raise DataError(f"--numina {n}: cannot read {name!r} from the hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); run without --numina or where the hub "
                        f"is reachable") from None


def model_split(items, model, tokenizer, args):
    """Split with a model and the Figure 3 prompt; returns {item index: contents} for the outputs that passed."""
    template = load_prompt(args.segment_prompt)
    prompts = [chat_prompt(tokenizer, template.format(question=item[2], solution=item[3])) for item in items]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=args.splitter_max_new_tokens,
                       batch_size=args.batch_size)
    accepted = {}
    for k, (item, out) in enumerate(zip(items, outputs)):
        contents = parse_model_split(out["text"])
        if contents is not None and same_content(item[3], contents):
            accepted[k] = contents
    return accepted


def make_ift(items, args, model=None, tokenizer=None):
    """IFT records; prints and returns counts (records, fallbacks, unsplittable)."""
    accepted = model_split(items, model, tokenizer, args) if args.splitter == "model" else {}
    records, counts = [], collections.Counter()
    for k, (rid, source, question, text, final_step, answer, dollar_math, lines) in enumerate(items):
        contents = accepted.get(k) or rule_split(text, args.min_step_chars, dollar_math, lines)
        counts["fallback"] += args.splitter == "model" and k not in accepted
        contents += [final_step] if final_step else []
        steps = number_steps(contents)
        # a line of the original that itself starts with "Step 3:" would be read back as a step of its own
        if not same_content(text + ("\n" + final_step if final_step else ""), contents) or not reads_back(steps):
            counts["unsplittable"] += 1
            continue
        records.append(dict(id=rid, source=source, question=question, solution="\n".join(steps), answer=answer))
        counts[source] += 1
    steps_per = [len(split_steps(r["solution"])) for r in records]
    chars_per = [len(s) for r in records for s in split_steps(r["solution"])]
    print(f"IFT: {len(records)} records " + ", ".join(f"{s} {counts[s]}" for s in ("math", "gsm8k", "numina")
                                                      if counts[s]) +
          f"; {counts['unsplittable']} skipped (content check or a 'Step n:' line in the original)")
    if records:
        print(f"IFT: steps per solution mean {statistics.mean(steps_per):.2f} median {statistics.median(steps_per)} "
              f"max {max(steps_per)}; chars per step mean {statistics.mean(chars_per):.1f}")
    if args.splitter == "model":
        print(f"IFT: model splitter accepted {len(accepted)}/{len(items)}, fell back to rules on "
              f"{counts['fallback']}")
    return records, counts


# ----------------------------------------------------------------------------------------------------------------
# EFT pairs from PRM800K-format step ratings


def previous_steps_of(responses):
    """`responses` (the earlier chosen steps) is a list in the file we have; a string is read as one step a line."""
    if isinstance(responses, str):
        return [s for s in responses.split("\n") if s.strip()]
    if not isinstance(responses, list) or not all(isinstance(s, str) for s in responses):
        raise ValueError(f"responses must be a list of strings or a string, got {type(responses).__name__}")
    return responses


def eft_pairs(rows, max_pairs_per_prefix=0, seed=0):
    """
    Rated rows -> (pairs, counts); a pair is dict(question, previous, good, bad) of raw step texts (no markers).
    Rows are grouped by prefix = (problem, earlier steps), whitespace-collapsed so copies merge (dedupe).
    """
    groups, counts = collections.OrderedDict(), collections.Counter()
    for r in rows:
        previous = [s.strip() for s in previous_steps_of(r["responses"])]
        key = (collapse_whitespace(r["instruction"]), tuple(map(collapse_whitespace, previous)))
        group = groups.setdefault(key, dict(question=r["instruction"].strip(), previous=previous,
                                            ratings=collections.defaultdict(set), text={}))
        step = collapse_whitespace(r["next_response"])
        counts[f"rating {r['rating']}"] += 1
        if r["rating"] in (1, -1) and step:
            group["ratings"][step].add(r["rating"])
            group["text"].setdefault(step, r["next_response"].strip())
    rng, pairs = random.Random(seed), []
    for key, g in groups.items():
        conflicting = [s for s, rs in g["ratings"].items() if len(rs) > 1]
        counts["steps rated both +1 and -1 (dropped)"] += len(conflicting)
        good = [g["text"][s] for s, rs in g["ratings"].items() if rs == {1}]
        bad = [g["text"][s] for s, rs in g["ratings"].items() if rs == {-1}]
        prefix_pairs = [(a, b) for a in good for b in bad]
        if max_pairs_per_prefix and len(prefix_pairs) > max_pairs_per_prefix:
            prefix_pairs = rng.sample(prefix_pairs, max_pairs_per_prefix)
        counts["prefixes"] += 1
        counts["prefixes with a pair"] += bool(prefix_pairs)
        for a, b in prefix_pairs:
            # a step text with a line starting "Step 3:" would be read back as two steps: leave such a pair out
            if all(reads_back(number_steps(g["previous"] + [s])) for s in (a, b)):
                pairs.append(dict(question=g["question"], previous=g["previous"], good=a, bad=b))
            else:
                counts["pairs left out (a 'Step n:' line inside a step)"] += 1
    return pairs, counts


def reads_back(steps):
    return split_steps(join_steps(steps)) == steps


def balanced_labels(n, seed):
    """n labels, exactly ceil(n/2) 'A' (the +1 step first), in an order fixed by the seed."""
    labels = ["A"] * ((n + 1) // 2) + ["B"] * (n // 2)
    random.Random(seed).shuffle(labels)
    return labels


def template_judgment(label):
    """Deviation: a fixed sentence stands in for the paper's o1-written explanation."""
    right, wrong = ("A", "B") if label == "A" else ("B", "A")
    return f"Assistant {right}'s step is correct. Assistant {wrong}'s step contains an error. [[{label}]]"


def cut_after_verdict(text):
    m = VERDICT.search(text)
    return text[:m.end()] if m else text


def pair_steps(pair, label):
    """(previous_steps, step_a, step_b) with "Step n: " markers; the +1 step goes to `label`'s position."""
    previous = number_steps(pair["previous"])
    k = len(previous) + 1
    good, bad = f"Step {k}: {pair['good']}", f"Step {k}: {pair['bad']}"
    return previous, *((good, bad) if label == "A" else (bad, good))


def eft_record(pair, label, judgment):
    previous, step_a, step_b = pair_steps(pair, label)
    key = "\x00".join([pair["question"], *pair["previous"], pair["good"], pair["bad"]])
    return dict(id="prm800k:" + hashlib.sha1(key.encode()).hexdigest()[:16], source="prm800k",
                question=pair["question"], previous_steps=previous, step_a=step_a, step_b=step_b, label=label,
                judgment=judgment)


def explain_pairs(pairs, labels, model, tokenizer, args):
    """
    The judge prompt in both orders for every pair; keep a pair only if the verdict agrees with the label in its
    assigned order (filter 1) and in the swapped order (filter 2), as the paper does for o1 (§2).
    Returns (kept [(pair, {label: judgment})], counts).
    """
    jobs = [(i, label) for i, first in enumerate(labels) for label in (first, "B" if first == "A" else "A")]
    items = []
    for i, label in jobs:
        previous, step_a, step_b = pair_steps(pairs[i], label)
        items.append((judge_context(pairs[i]["question"], previous), step_a, step_b))
    outputs = judge_pairs(model, tokenizer, load_prompt(args.judge_prompt), items,
                          max_new_tokens=args.explainer_max_new_tokens, batch_size=args.batch_size)
    judged = collections.defaultdict(dict)
    for (i, label), (verdict, text) in zip(jobs, outputs):
        judged[i][label] = (verdict, cut_after_verdict(text))
    kept, counts = [], collections.Counter()
    for i, first in enumerate(labels):
        second = "B" if first == "A" else "A"
        counts["unparsed verdicts"] += sum(judged[i][lab][0] is None for lab in (first, second))
        if judged[i][first][0] != first:
            counts["dropped by filter 1 (verdict != label)"] += 1
        elif judged[i][second][0] != second:
            counts["dropped by filter 2 (verdict changes with A/B swapped)"] += 1
        else:
            kept.append((pairs[i], {lab: judged[i][lab][1] for lab in (first, second)}))
    counts["kept"] = len(kept)
    return kept, counts


def make_eft(rows, args, model=None, tokenizer=None):
    pairs, counts = eft_pairs(rows, args.max_pairs_per_prefix, args.seed)
    labels = balanced_labels(len(pairs), args.seed)
    if model is None:
        records = [eft_record(p, lab, template_judgment(lab)) for p, lab in zip(pairs, labels)]
    else:
        kept, filter_counts = explain_pairs(pairs, labels, model, tokenizer, args)
        print("EFT explainer: " + ", ".join(f"{k} {v}" for k, v in filter_counts.items()))
        counts.update(filter_counts)
        records = [eft_record(p, lab, judgments[lab])
                   for (p, judgments), lab in zip(kept, balanced_labels(len(kept), args.seed))]
    per_problem = collections.Counter(r["question"] for r in records)
    print("EFT: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    num_a = sum(r["label"] == "A" for r in records)
    print(f"EFT: {len(records)} pairs over {len(per_problem)} problems; label A {num_a} / B {len(records) - num_a}")
    if records:
        n = sorted(per_problem.values())
        print(f"EFT: pairs per problem mean {statistics.mean(n):.1f} median {statistics.median(n)} max {n[-1]}")
    return records, counts


# ----------------------------------------------------------------------------------------------------------------
# contamination


def problem_set(path):
    """Whitespace-collapsed problem texts of a test file (field problem or question)."""
    return {collapse_whitespace(r.get("problem", r.get("question", ""))) for r in read_jsonl(path)}


def report_overlap(records, test_problems, test_path, what, exclude):
    hits = [r for r in records if collapse_whitespace(r["question"]) in test_problems]
    problems = {collapse_whitespace(r["question"]) for r in hits}
    if hits:
        print(f"!!! WARNING: {what}: {len(hits)} records on {len(problems)} problems that are in the TEST SET "
              f"{test_path}. " + ("Dropped (--exclude-test-problems)." if exclude else
                                  "Kept: training on them contaminates evaluation on that test set; pass "
                                  "--exclude-test-problems to drop them."))
    else:
        print(f"{what}: no problem of {test_path} occurs")
    hit_ids = {r["id"] for r in hits}
    return [r for r in records if r["id"] not in hit_ids] if exclude else records


# ----------------------------------------------------------------------------------------------------------------
# every input of the paper preset, by hub name (datasets.load_dataset), mapped to the native JSONL records the code
# reads (evaluate.normalize, the IFT/EFT builders above). `--source hub` downloads them into <out-dir>/hub/ in the
# layout of a local folder of copies; `--source DIR` reads such a folder as is. Everything after reads local files.


def load_hub(name, config=None, split="train", **kwargs):
    """datasets.load_dataset(name, config, split=...) as a list of dicts; a DataError if it cannot be read."""
    try:
        import datasets
        return [dict(r) for r in datasets.load_dataset(name, config, split=split, **kwargs)]
    except Exception as e:  # no network, no hub, no `datasets`, a renamed set: all end here
        raise DataError(f"cannot load {name}{'/' + config if config else ''} ({split}) from the hub "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); run where the hub is "
                        f"reachable, or pass --source DIR with local JSONL copies (layout: prepare/paper_data.py)") \
            from None


def native(record, drop=()):
    """A hub record as the JSONL line the code reads: its fields as they are, minus those that are None (Arrow
    gives a field that only some rows have to every row, as None) and those in drop."""
    return {k: v for k, v in record.items() if v is not None and k not in drop}


MATH_SUBJECTS = ["algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus"]
OLYMPIAD_IMAGES = [f"image_{k}" for k in range(1, 6)]

# local path -> the set downloaded and its records mapped. Hub names, configs, splits and fields: the dataset cards.
HUB_SETS = {
    # GSM8K (Cobbe et al. 2021): config "main", splits train/test, {question, answer ending "#### N"}
    "gsm8k/train.jsonl": lambda: [native(r) for r in load_hub("openai/gsm8k", "main", "train")],
    "gsm8k/test.jsonl": lambda: [native(r) for r in load_hub("openai/gsm8k", "main", "test")],
    # MATH (Hendrycks et al. 2021), 7,500 train / 5,000 test: one config per subject, {problem, level, type, solution}
    "math/train.jsonl": lambda: [native(r) for subject in MATH_SUBJECTS
                                 for r in load_hub("EleutherAI/hendrycks_math", subject, "train")],
    "math/test.jsonl": lambda: [native(r) for subject in MATH_SUBJECTS
                                for r in load_hub("EleutherAI/hendrycks_math", subject, "test")],
    # MATH-500 (PRM800K's 500-problem test split): {problem, solution, answer, subject, level, unique_id}
    "math500/test.jsonl": lambda: [native(r) for r in load_hub("HuggingFaceH4/MATH-500", None, "test")],
    # Gaokao2023En, the source of Qwen2.5-Math's gaokao2023en (MARIO, Liao et al. 2024): {question, answer, ...}
    "gaokao2023en/test.jsonl": lambda: [native(r) for r in load_hub("MARIO-Math-Reasoning/Gaokao2023-Math-En")],
    # OlympiadBench (He et al. 2024), open-ended text-only English competition maths: {id, question, context,
    # final_answer: [str], solution: [str], ...}; its image columns are empty in this text-only subset
    "olympiadbench/test.jsonl": lambda: [native(r, drop=OLYMPIAD_IMAGES)
                                         for r in load_hub("Hothan/OlympiadBench", "OE_TO_maths_en_COMP")],
    # AIME 2024 I and II, 30 problems: {id, problem, solution, answer, url, year}
    "aime24/test.jsonl": lambda: [native(r) for r in load_hub("HuggingFaceH4/aime_2024")],
    # AMC 2023: the 40 AMC 12 2023 problems of AI-MO's 83 (2022-2023), {id, problem, answer (a float), url}
    "amc23/test.jsonl": lambda: [native(r) for r in load_hub("AI-MO/aimo-validation-amc")
                                 if "2023_AMC" in r["url"]],
    # PRM800K (Lightman et al. 2023) phase-1 test ratings, one row per rated step, as converted by
    # scottlogic-alex/prm800k-denorm: {instruction, responses, next_response, answer, is_human_response,
    # is_solution, is_preferred_response, rating} (rating and answer may be null: kept)
    "prm800k/phase1_test_stepwise_critique.jsonl": lambda: load_hub(
        "Birchlabs/openai-prm800k-stepwise-critic", None, "test",
        data_files={"test": "data/phase1_test.stepwise-critic.parquet"}),
}


def fetch_hub(folder):
    """Download every set of HUB_SETS into folder/<path>; a file already there is kept (a rerun downloads nothing)."""
    for path, fetch in HUB_SETS.items():
        out = os.path.join(folder, path)
        if os.path.exists(out):
            continue
        records = fetch()
        write_jsonl(out, records)
        print(f"hub -> {out}: {len(records)} records")


def check_source(folder):
    """A local folder of copies must hold every file of HUB_SETS (its layout); a clear error names those missing."""
    missing = [p for p in HUB_SETS if not os.path.exists(os.path.join(folder, p))]
    if missing:
        raise DataError(f"--source {folder}: missing {', '.join(missing)} (the layout of --source hub's copies; "
                        f"or pass --source hub to download them)")


# ----------------------------------------------------------------------------------------------------------------
# the paper preset's data set in one command (presets/paper.sh)


def content_id(source, text):
    """An id made from the text itself: the same whichever copy (hub or local file) the record came from."""
    return f"{source}:{hashlib.sha1(text.encode()).hexdigest()[:16]}"


def canonical_order(rows, text_field):
    """The rows sorted by their text, then shuffled with seed 0: a fixed order that depends on the records' content
    only, never on how a copy orders them (the hub's MATH comes one subject config at a time)."""
    rows = sorted(rows, key=lambda r: r[text_field])
    random.Random(0).shuffle(rows)
    return rows


def hold_out_questions(rows, text_field, source, counts, out_dir):
    """
    Iteration questions (paper: 400/800/1200 NuminaMath questions): the first of the canonically ordered training
    problems, without answers (the loop uses none), written as questions1..3.jsonl {id, question}. Returns the rest,
    which go to IFT (a question the loop searches is never an SFT example).
    """
    start = 0
    for t, n in enumerate(counts, 1):
        write_jsonl(os.path.join(out_dir, f"questions{t}.jsonl"),
                    [dict(id=content_id(source, r[text_field]), question=r[text_field]) for r in rows[start:start + n]])
        start += n
    return rows[start:]


def split_eft_by_problem(eft, every=5):
    """
    Judge accuracy (paper Table 3: 500 held-out pairs of its own EFT data). The PRM800K sample has ~1.5k pairs on 76
    problems, so every `every`-th problem's pairs are held out, by problem: no prefix of a test pair leaks into SFT.
    """
    held = set(sorted({r["question"] for r in eft})[::every])
    return [r for r in eft if r["question"] not in held], [r for r in eft if r["question"] in held]


def build_paper_set(args):
    """
    paper: IFT = 28,889 NuminaMath-CoT solutions split into steps by o1; EFT = 4,167 PRM-found step pairs judged by
    o1; iterations: 400/800/1200 NuminaMath questions. Here (defaults): iteration questions are 2,400 MATH train
    problems held out of IFT (--question-source gsm8k: GSM8K train ones); IFT = the other 5,100 MATH train + 7,473
    GSM8K train solutions, split into steps by rules; EFT = PRM800K's +1/-1 rated steps at a shared prefix, template
    judgments. The build reads only the records' content, so the hub's copies and local ones give the same files.
    eft_test.jsonl is written last: its presence means the whole set is there.
    """
    out = args.out_dir
    if args.source == "hub":
        src = os.path.join(out, "hub")
        fetch_hub(src)  # a file already there is kept: a rerun downloads nothing
    else:
        src = args.source
        check_source(src)
    sources = {name: os.path.join(src, *path) for name, path in [
        ("math", ["math", "train.jsonl"]), ("gsm8k", ["gsm8k", "train.jsonl"]), ("test_set", ["math", "test.jsonl"]),
        ("prm800k", ["prm800k", "phase1_test_stepwise_critique.jsonl"])]}
    manifest = stage_manifest("paper_data", sources, output_flags(args, *NOT_OUTPUT))
    if is_done(os.path.join(out, "eft_test.jsonl"), manifest, args.overwrite):
        return
    math_train = read_jsonl(os.path.join(src, "math", "train.jsonl"), ["problem", "solution"])
    gsm8k_train = read_jsonl(os.path.join(src, "gsm8k", "train.jsonl"), ["question", "answer"])
    math_rows = canonical_order([dict(problem=r["problem"], solution=r["solution"]) for r in math_train], "problem")
    gsm8k_rows = canonical_order([dict(question=r["question"], answer=r["answer"]) for r in gsm8k_train], "question")
    if args.question_source == "math":
        math_rows = hold_out_questions(math_rows, "problem", "math", args.num_questions, out)
    else:
        gsm8k_rows = hold_out_questions(gsm8k_rows, "question", "gsm8k", args.num_questions, out)
    args.math, args.gsm8k = os.path.join(out, "math_train_ift.jsonl"), os.path.join(out, "gsm8k_train_ift.jsonl")
    write_jsonl(args.math, math_rows)
    write_jsonl(args.gsm8k, gsm8k_rows)
    args.prm800k = os.path.join(src, "prm800k", "phase1_test_stepwise_critique.jsonl")
    args.test_set = os.path.join(src, "math", "test.jsonl")
    args.out_ift, args.out_eft = os.path.join(out, "ift.jsonl"), os.path.join(out, "eft_all.jsonl")
    build_ift_and_eft(args)
    train, test = split_eft_by_problem(read_jsonl(args.out_eft))
    write_jsonl(os.path.join(out, "eft.jsonl"), train)
    write_jsonl(os.path.join(out, "eft_test.jsonl"), test)
    write_manifest(os.path.join(out, "eft_test.jsonl"), manifest)
    print(f"EFT: {len(train)} pairs for SFT, {len(test)} held out on "
          f"{len({r['question'] for r in test})} problems")


NOT_OUTPUT = ("batch_size", "source", "out_ift", "out_eft")  # flags that do not change what a builder writes


def build_ift_and_eft(args):
    test_problems = problem_set(args.test_set) if os.path.exists(args.test_set) else None
    if test_problems is None:
        print(f"!!! WARNING: --test-set {args.test_set} not found: overlap with the test set is NOT checked")
    test_set = args.test_set if test_problems is not None else None
    model = args.splitter == "model"
    ift_manifest = stage_manifest("paper_data ift", dict(
        math=args.math, gsm8k=args.gsm8k, test_set=test_set, splitter_model=args.splitter_model if model else None,
        segment_prompt=prompt_path(args.segment_prompt) if model else None), output_flags(args, *NOT_OUTPUT))
    eft_manifest = stage_manifest("paper_data eft", dict(
        prm800k=args.prm800k, test_set=test_set, explainer_model=args.explainer_model,
        judge_prompt=prompt_path(args.judge_prompt) if args.explainer_model else None),
        output_flags(args, *NOT_OUTPUT))

    if args.out_ift and not is_done(args.out_ift, ift_manifest, args.overwrite, [args.out_ift + ".config.json"]):
        model, tokenizer = load_model(args.splitter_model) if args.splitter == "model" else (None, None)
        records, _ = make_ift(ift_items(args), args, model, tokenizer)
        if test_problems is not None:
            records = report_overlap(records, test_problems, args.test_set, "IFT", args.exclude_test_problems)
        random.Random(args.seed).shuffle(records)  # any first N (train_sft.py --limit) mixes the sources
        write_jsonl(args.out_ift, records)
        save_config(args, args.out_ift + ".config.json")
        write_manifest(args.out_ift, ift_manifest)
        print(f"wrote {len(records)} IFT records to {args.out_ift}")

    if args.out_eft and not is_done(args.out_eft, eft_manifest, args.overwrite, [args.out_eft + ".config.json"]):
        print("!!! WARNING: the PRM800K phase1_test sample's problems are MATH-500 TEST problems; EFT pairs from it "
              "put test problems into M1's training data (see the overlap count below).")
        rows = read_jsonl(args.prm800k, ["instruction", "responses", "next_response", "rating"])[:args.limit]
        for lineno, r in enumerate(rows, 1):
            try:
                previous_steps_of(r["responses"])
            except ValueError as e:
                raise DataError(f"{args.prm800k}:{lineno}: {e}") from None
        model, tokenizer = load_model(args.explainer_model) if args.explainer_model else (None, None)
        records, _ = make_eft(rows, args, model, tokenizer)
        if test_problems is not None:
            records = report_overlap(records, test_problems, args.test_set, "EFT", args.exclude_test_problems)
        random.Random(args.seed).shuffle(records)  # any first N mixes the problems
        write_jsonl(args.out_eft, records)
        save_config(args, args.out_eft + ".config.json")
        write_manifest(args.out_eft, eft_manifest)
        print(f"wrote {len(records)} EFT records to {args.out_eft}")


def int_list(text):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 400,800,1200") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: counts must be >= 0")
    return values


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--math", help="MATH train JSONL (problem, solution); IFT source")
    p.add_argument("--gsm8k", help="GSM8K train JSONL (question, answer); IFT source")
    p.add_argument("--numina", type=int, default=0, help="also take the first N NuminaMath-CoT solutions (hub)")
    p.add_argument("--numina-dataset", default="AI-MO/NuminaMath-CoT", help="hub name (paper §2's IFT source)")
    p.add_argument("--prm800k", help="PRM800K-format step ratings JSONL; EFT source")
    p.add_argument("--out-ift", help="IFT output JSONL")
    p.add_argument("--out-eft", help="EFT output JSONL")
    p.add_argument("--limit", type=int, default=None, help="use only the first N records of each input file")
    p.add_argument("--splitter", choices=["rule", "model"], default="rule",
                   help="paper: o1 with the Figure 3 prompt; default here: rules that only cut the text")
    p.add_argument("--splitter-model", help="model dir for --splitter model")
    p.add_argument("--segment-prompt", default="segment", help="prompt file for --splitter model (paper Fig. 3)")
    p.add_argument("--splitter-max-new-tokens", type=int, default=1024)
    p.add_argument("--min-step-chars", type=int, default=20,
                   help="pieces shorter than this merge into the next one (not stated; our choice)")
    p.add_argument("--keep-calculator", action="store_true", help="keep GSM8K's <<a*b=c>> annotations")
    p.add_argument("--max-pairs-per-prefix", type=int, default=0,
                   help="EFT: at most this many +1/-1 pairs per prefix, sampled by --seed (0: all)")
    p.add_argument("--explainer-model", help="model dir that writes EFT judgments (paper: o1); default: template")
    p.add_argument("--judge-prompt", default="judge", help="prompt file for --explainer-model (paper Fig. 5)")
    p.add_argument("--explainer-max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16, help="generation batch size (model splitter/explainer)")
    p.add_argument("--test-set", default="data/math500/test.jsonl",
                   help="test problems to check for overlap (MATH-500); the check is skipped if the file is absent")
    p.add_argument("--exclude-test-problems", action="store_true", help="drop records whose problem is in --test-set")
    p.add_argument("--seed", type=int, default=0, help="A/B positions and per-prefix sampling")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--source", help="with --out-dir: hub (download every set, HUB_SETS) or a folder of local JSONL "
                   "copies in the same layout (gsm8k/, math/, math500/, ..., prm800k/)")
    p.add_argument("--out-dir", help="build the paper preset's whole data set here (questions1..3, ift, eft, "
                   "eft_test) from --source; the other input and output flags are then set from these two")
    p.add_argument("--question-source", choices=["math", "gsm8k"], default="math",
                   help="with --out-dir: the training set the iteration questions are drawn from (and held out of IFT)")
    p.add_argument("--num-questions", type=int_list, default=[400, 800, 1200],
                   help="with --out-dir: questions per iteration, comma-separated (paper: 400,800,1200)")
    args = p.parse_args()
    if args.out_dir:
        if not args.source:
            raise DataError("--out-dir needs --source")
    elif not (args.out_ift or args.out_eft):
        raise DataError("nothing to do: give --out-ift and/or --out-eft (or --out-dir)")
    if args.out_ift and not (args.math or args.gsm8k or args.numina) and not args.out_dir:
        raise DataError("--out-ift needs --math, --gsm8k and/or --numina")
    if args.out_eft and not args.prm800k and not args.out_dir:
        raise DataError("--out-eft needs --prm800k")
    if args.splitter == "model" and not args.splitter_model:
        raise DataError("--splitter model needs --splitter-model DIR")
    if args.out_dir:
        build_paper_set(args)
    else:
        build_ift_and_eft(args)


if __name__ == "__main__":
    cli(main)
