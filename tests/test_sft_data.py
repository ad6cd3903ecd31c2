"""
make_sft_data.py: the rule-based splitter never changes content (hand-made cases and real MATH/GSM8K solutions),
the model-based splitter's altered outputs are rejected, and EFT pairs come out right on a hand-made PRM800K file.

    python -m pytest tests/test_sft_data.py -q
"""

import argparse
import json
import os
import re
import sys
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import modeling  # noqa: E402
from common import join_steps, parse_verdict, read_jsonl, split_steps  # noqa: E402
from prepare import paper_data as msd  # noqa: E402

DATA_DIRS = [d for d in (os.environ.get("PSRLM_DATA"), os.path.join(REPO, "data"), "/work/shared/data") if d]


def data_file(relative):
    for d in DATA_DIRS:
        if os.path.exists(os.path.join(d, relative)):
            return os.path.join(d, relative)
    pytest.skip(f"{relative} not found under {DATA_DIRS} (set PSRLM_DATA to the benchmark data folder)")


def check_split(text, contents, pieces=None):
    """The invariant in both its forms: exact slices (rule-based), and same_content after the Step markers."""
    if pieces is not None:
        assert "".join(pieces) == text
    steps = msd.number_steps(contents)
    assert all(s.startswith(f"Step {n}: ") for n, s in enumerate(steps, 1))
    recovered = msd.strip_markers(split_steps(join_steps(steps)))
    assert recovered == contents
    assert msd.same_content(text, recovered)
    assert msd.collapse_whitespace(" ".join(recovered)).replace(" ", "") == re.sub(r"\s", "", text)


def rule_split_checked(text, min_chars=0, dollar_math=True, lines=False):
    pieces = msd.split_pieces(text, dollar_math, lines)
    contents = msd.rule_split(text, min_chars, dollar_math, lines)
    check_split(text, contents, pieces)
    return contents


# ----------------------------------------------------------------------------------------------------------------
# splitter, hand-made


def test_sentences_split_and_decimals_kept():
    text = "Each apple costs 3.5 dollars. So 4 apples cost $4 \\times 3.5 = 14$ dollars! Is that all? Yes."
    assert rule_split_checked(text) == ["Each apple costs 3.5 dollars.",
                                        "So 4 apples cost $4 \\times 3.5 = 14$ dollars!", "Is that all?", "Yes."]


def test_no_cut_inside_inline_or_display_math():
    text = ("We have $x = 1. Y = 2$ here. Then \\[a = 1. B = 2.\\] Next $$c = 3. D = 4$$ and "
            "\\begin{align*} e &= 5. \\\\ F &= 6. \\end{align*} Done. Also \\(g = 7. H\\) is fine.")
    contents = rule_split_checked(text)
    assert contents == ["We have $x = 1. Y = 2$ here.",
                        "Then \\[a = 1. B = 2.\\]",
                        "Next $$c = 3. D = 4$$ and \\begin{align*} e &= 5. \\\\ F &= 6. \\end{align*}",
                        "Done.", "Also \\(g = 7. H\\) is fine."]


def test_display_block_glued_to_next_sentence_is_cut_without_inventing_a_space():
    text = "Thus \\[x = 3.\\]Find the rest. Hence\n\\begin{align*}\ny &= 2.\n\\end{align*}\nThe end."
    contents = rule_split_checked(text)
    assert contents == ["Thus \\[x = 3.\\]", "Find the rest.", "Hence\n\\begin{align*}\ny &= 2.\n\\end{align*}",
                        "The end."]


def test_nested_environments_and_escaped_dollars():
    text = ("Cost is $\\$1.24$. Then \\begin{align*} \\begin{cases} a. B \\end{cases} \\end{align*} ok. "
            "Last $x.$ Next one.")
    assert rule_split_checked(text) == ["Cost is $\\$1.24$.",
                                        "Then \\begin{align*} \\begin{cases} a. B \\end{cases} \\end{align*} ok.",
                                        "Last $x.$", "Next one."]


def test_abbreviations_list_numbers_and_lowercase_are_not_sentence_ends():
    text = "Use a rule, e.g. The one above. This is approx. the value, i.e. about 2.\n1. First item. vs. Two."
    assert rule_split_checked(text) == ["Use a rule, e.g. The one above.", "This is approx. the value, i.e. about 2.",
                                        "1. First item. vs. Two."]


def test_asy_figure_stays_with_its_sentence_and_is_never_cut():
    text = "Draw it. [asy]\ndraw((0,0)--(1,1));\nlabel(\"A. B\", (0,0));\n[/asy] The area is $\\boxed{2}$."
    assert rule_split_checked(text) == ["Draw it. [asy]\ndraw((0,0)--(1,1));\nlabel(\"A. B\", (0,0));\n[/asy]",
                                        "The area is $\\boxed{2}$."]


def test_unclosed_dollar_is_plain_text_and_blank_lines_cut():
    text = "She pays $12 an hour. Then she works 3 hours\n\nso she earns $36"
    assert rule_split_checked(text) == ["She pays $12 an hour.", "Then she works 3 hours", "so she earns $36"]


def test_short_pieces_merge_into_the_next_and_a_short_tail_into_the_previous():
    text = "Let $x=2$. Then $x^2 = 4$ as computed. OK."
    assert rule_split_checked(text, min_chars=0) == ["Let $x=2$.", "Then $x^2 = 4$ as computed.", "OK."]
    assert rule_split_checked(text, min_chars=20) == ["Let $x=2$. Then $x^2 = 4$ as computed. OK."]
    assert rule_split_checked("A long enough first sentence. Tiny.", min_chars=20) == \
        ["A long enough first sentence. Tiny."]


def test_gsm8k_calculator_stripped_and_answer_step():
    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 in total\n#### 72"
    body, final = msd.gsm8k_body(answer)
    assert body == "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 in total" and final == "72"
    kept, _ = msd.gsm8k_body(answer, keep_calculator=True)
    assert "<<48/2=24>>" in kept
    contents = rule_split_checked(body, dollar_math=False, lines=True)
    assert contents == ["Natalia sold 48/2 = 24 clips in May.", "She sold 48+24 = 72 in total"]
    with pytest.raises(ValueError):
        msd.gsm8k_body("no final line")


def test_same_content_is_exact_modulo_whitespace():
    original = "Thus \\[x = 3.\\]Find  the\nrest. Done."
    assert msd.same_content(original, ["Thus \\[x = 3.\\]", "Find the rest.", "Done."])
    assert msd.same_content(original, ["Thus \\[x = 3.\\]Find the rest.\n\n", "Done."])
    assert not msd.same_content(original, ["Thus \\[x = 4.\\]", "Find the rest.", "Done."])  # a digit changed
    assert not msd.same_content(original, ["Thus \\[x = 3.\\]", "Find the rest."])  # a sentence dropped
    assert not msd.same_content(original, ["Thus \\[x = 3.\\]", "Find the rest.", "Done.", "Extra."])
    assert not msd.same_content(original, ["Thus \\[x = 3.\\]", "", "Find the rest. Done."])  # an empty step
    assert not msd.same_content("ab", ["a b"])  # a space inside a step is content


def test_strip_markers_needs_steps_numbered_from_one():
    assert msd.strip_markers(["Step 1: a", "Step 2:b"]) == ["a", "b"]
    assert msd.strip_markers(["Step 1: a", "Step 3: b"]) is None
    assert msd.parse_model_split("Here you go:\nStep 1: a\nStep 2: b") is None  # preamble joins step 1
    assert msd.parse_model_split("Step 1: a\nStep 2: b") == ["a", "b"]


def test_last_boxed():
    assert msd.last_boxed("so $\\boxed{\\frac{1}{2}}$ and then $\\boxed{x^{2}}$.") == "x^{2}"
    assert msd.last_boxed("no box") is None


# ----------------------------------------------------------------------------------------------------------------
# splitter, real data


def test_rule_splitter_invariant_on_real_math():
    rows = read_jsonl(data_file("math/train.jsonl"), ["problem", "solution"])[:400]
    steps_per = []
    for r in rows:
        text = r["solution"]
        pieces = msd.split_pieces(text)
        for a, b, _, _ in msd.protected_spans(text):  # no cut inside maths or a figure
            starts = [sum(map(len, pieces[:k])) for k in range(len(pieces))]
            assert not any(a < s < b for s in starts)
        contents = msd.rule_split(text, 20)
        check_split(text, contents, pieces)
        steps_per.append(len(contents))
    assert sum(steps_per) / len(steps_per) > 2  # it does split


def test_rule_splitter_invariant_on_real_gsm8k():
    rows = read_jsonl(data_file("gsm8k/train.jsonl"), ["question", "answer"])[:400]
    for r in rows:
        body, final = msd.gsm8k_body(r["answer"])
        assert "<<" not in body and "####" not in body
        contents = msd.rule_split(body, 20, dollar_math=False, lines=True)
        check_split(body, contents, msd.split_pieces(body, dollar_math=False, lines=True))


# ----------------------------------------------------------------------------------------------------------------
# IFT records and the model-based splitter (generate faked)


def ift_args(**kw):
    defaults = dict(splitter="rule", min_step_chars=0, segment_prompt="segment", splitter_max_new_tokens=64,
                    batch_size=4)
    return argparse.Namespace(**{**defaults, **kw})


ITEMS = [("t:0", "math", "What is 1+1?", "We add. So $1+1=\\boxed{2}$.", None, "2", True, False),
         ("t:1", "gsm8k", "How many?", "He has 2 apples.\nHe buys 3 more", "The answer is \\boxed{5}.", "5", False,
          True)]


def test_ift_records_rule_splitter():
    records, counts = msd.make_ift(ITEMS, ift_args())
    assert [r["solution"] for r in records] == [
        "Step 1: We add.\nStep 2: So $1+1=\\boxed{2}$.",
        "Step 1: He has 2 apples.\nStep 2: He buys 3 more\nStep 3: The answer is \\boxed{5}."]
    assert records[1]["answer"] == "5" and counts["unsplittable"] == 0


def test_model_splitter_rejects_altered_output_and_falls_back(monkeypatch):
    outputs = ["Step 1: We add.\nStep 2: So $1+1=\\boxed{3}$.",  # content altered: rejected
               "Step 1: He has 2 apples. He buys 3 more"]  # content kept, model's own split: accepted
    seen = {}

    def fake_generate(model, tokenizer, prompts, max_new_tokens, **kw):
        seen["prompts"] = prompts
        return [dict(text=t, eos=True, new_tokens=10) for t in outputs]

    monkeypatch.setattr(msd, "generate", fake_generate)
    records, counts = msd.make_ift(ITEMS, ift_args(splitter="model"), model=None,
                                   tokenizer=types.SimpleNamespace(chat_template=None))
    assert "Only divide the steps without altering" in seen["prompts"][0]  # the Figure 3 prompt
    assert "[The Start of Solution Provided]\nWe add. So $1+1=\\boxed{2}$." in seen["prompts"][0]
    assert counts["fallback"] == 1
    assert records[0]["solution"] == "Step 1: We add.\nStep 2: So $1+1=\\boxed{2}$."  # the rule-based split
    assert records[1]["solution"] == "Step 1: He has 2 apples. He buys 3 more\nStep 2: The answer is \\boxed{5}."


# ----------------------------------------------------------------------------------------------------------------
# EFT pairs from a hand-made PRM800K-format file

Q1, Q2 = "Find $x$ if $2x = 6$.", "Compute $3 + 4$."


def prm_row(question, previous, step, rating):
    return dict(instruction=question, responses=previous, next_response=step, answer=None, is_human_response=False,
                is_solution=False, is_preferred_response=False, rating=rating)


PRM_ROWS = [
    prm_row(Q1, [], "Divide both sides by 2.", 1),
    prm_row(Q1, [], "Subtract 2 from both sides.", -1),
    prm_row(Q1, [], "Subtract  2 from both sides.", -1),  # whitespace copy of the last: merged
    prm_row(Q1, [], "Multiply by 2.", 0),  # neutral: unused
    prm_row(Q1, ["Divide both sides by 2."], "So $x = 3$.", 1),
    prm_row(Q1, ["Divide both sides by 2."], "So $x = 3$, i.e. $\\boxed{3}$.", 1),  # same rating: no pair
    prm_row(Q2, [], "It is 7.", 1),
    prm_row(Q2, [], "It is 8.", -1),
    prm_row(Q2, [], "It is 12.", -1),
    prm_row(Q2, [], "It is 9.", -1),
    prm_row(Q2, [], "It is 9.", 1),  # rated both ways at one prefix: dropped
    prm_row(Q2, [], "A human wrote this.", None),
    prm_row(Q2, ["It is 7."], "Done: $\\boxed{7}$.", 1),
    prm_row(Q2, ["It is 7."], "Done: $\\boxed{8}$.", -1),
]


@pytest.fixture
def prm_rows(tmp_path):
    path = tmp_path / "prm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PRM_ROWS))
    return read_jsonl(str(path), ["instruction", "responses", "next_response", "rating"])


def eft_args(**kw):
    defaults = dict(max_pairs_per_prefix=0, seed=0, judge_prompt="judge", explainer_max_new_tokens=64, batch_size=4)
    return argparse.Namespace(**{**defaults, **kw})


def good_step(record):
    return record["step_a"] if record["label"] == "A" else record["step_b"]


def test_eft_pairs_opposite_ratings_only(prm_rows):
    pairs, counts = msd.eft_pairs(prm_rows)
    got = {(p["question"], tuple(p["previous"]), p["good"], p["bad"]) for p in pairs}
    assert got == {(Q1, (), "Divide both sides by 2.", "Subtract 2 from both sides."),
                   (Q2, (), "It is 7.", "It is 8."), (Q2, (), "It is 7.", "It is 12."),
                   (Q2, ("It is 7.",), "Done: $\\boxed{7}$.", "Done: $\\boxed{8}$.")}
    assert counts["steps rated both +1 and -1 (dropped)"] == 1
    capped, _ = msd.eft_pairs(prm_rows, max_pairs_per_prefix=1)
    assert len(capped) == 3


def test_eft_records_balanced_and_label_is_the_good_step(prm_rows):
    records, _ = msd.make_eft(prm_rows, eft_args())
    assert len(records) == 4 and sum(r["label"] == "A" for r in records) == 2
    for r in records:
        k = len(r["previous_steps"]) + 1
        assert [s.split(": ", 1)[0] for s in r["previous_steps"]] == [f"Step {n}" for n in range(1, k)]
        assert r["step_a"].startswith(f"Step {k}: ") and r["step_b"].startswith(f"Step {k}: ")
        pair = [p for p in PRM_ROWS if p["instruction"] == r["question"] and p["rating"] == 1 and
                good_step(r) == f"Step {k}: {p['next_response']}"]
        assert pair, r  # the labelled step is the +1 step
        assert r["judgment"].endswith(f"[[{r['label']}]]") and parse_verdict(r["judgment"]) == r["label"]
    assert len({r["id"] for r in records}) == 4
    again, _ = msd.make_eft(prm_rows, eft_args())
    assert again == records  # deterministic
    for n in range(7):
        labels = msd.balanced_labels(n, seed=3)
        assert labels.count("A") == (n + 1) // 2 and labels.count("B") == n // 2


def judge_by(rule):
    """A fake generate that answers the judge prompt: rule(step_a, step_b) -> the text it writes."""
    def fake_generate(model, tokenizer, prompts, max_new_tokens, **kw):
        texts = []
        for p in prompts:
            a = re.search(r"Assistant A's Next Reasoning Step\]\n(.*?)\n\[The End", p, re.S).group(1)
            b = re.search(r"Assistant B's Next Reasoning Step\]\n(.*?)\n\[The End", p, re.S).group(1)
            texts.append(rule(a, b))
        return [dict(text=t, eos=True, new_tokens=5) for t in texts]
    return fake_generate


GOOD = {"Divide both sides by 2.", "It is 7.", "Done: $\\boxed{7}$."}


def is_good(step):
    return step.split(": ", 1)[1] in GOOD


def test_explainer_filters(prm_rows, monkeypatch):
    tok = types.SimpleNamespace(chat_template=None)
    monkeypatch.setattr(modeling, "generate", judge_by(lambda a, b: "A is right. [[A]] trailing" if is_good(a)
                                                  else "B is right. [[B]]"))
    records, counts = msd.make_eft(prm_rows, eft_args(), model=object(), tokenizer=tok)
    assert counts["kept"] == 4 and sum(r["label"] == "A" for r in records) == 2
    assert all(r["judgment"].endswith(f"[[{r['label']}]]") for r in records)  # cut after the verdict

    monkeypatch.setattr(modeling, "generate", judge_by(lambda a, b: "[[A]]"))  # position bias
    records, counts = msd.make_eft(prm_rows, eft_args(), model=object(), tokenizer=tok)
    assert records == [] and counts["dropped by filter 1 (verdict != label)"] == 2
    assert counts["dropped by filter 2 (verdict changes with A/B swapped)"] == 2

    monkeypatch.setattr(modeling, "generate", judge_by(lambda a, b: "no verdict, or both [[A]] [[B]]"))
    records, counts = msd.make_eft(prm_rows, eft_args(), model=object(), tokenizer=tok)
    assert records == [] and counts["unparsed verdicts"] == 8


def test_overlap_reported_and_excluded_only_when_asked(capsys):
    records = [dict(id="a", question="Compute  $3 + 4$."), dict(id="b", question="Other.")]
    kept = msd.report_overlap(records, {"Compute $3 + 4$."}, "test.jsonl", "EFT", exclude=False)
    assert kept == records and "WARNING" in capsys.readouterr().out
    assert msd.report_overlap(records, {"Compute $3 + 4$."}, "test.jsonl", "EFT", exclude=True) == records[1:]


def test_cli_writes_both_outputs_and_skips_when_done(tmp_path, monkeypatch, capsys):
    math = tmp_path / "math.jsonl"
    math.write_text(json.dumps(dict(problem="What is 1+1?", solution="We add. So $1+1=\\boxed{2}$.")) + "\n")
    prm = tmp_path / "prm.jsonl"
    prm.write_text("".join(json.dumps(r) + "\n" for r in PRM_ROWS))
    test_set = tmp_path / "test.jsonl"
    test_set.write_text(json.dumps(dict(problem=Q2)) + "\n")
    argv = ["paper_data.py", "--math", str(math), "--prm800k", str(prm), "--out-ift", str(tmp_path / "ift.jsonl"),
            "--out-eft", str(tmp_path / "eft.jsonl"), "--test-set", str(test_set), "--min-step-chars", "0"]
    monkeypatch.setattr(sys, "argv", argv)
    msd.main()
    assert "WARNING: EFT: 3 records on 1 problems" in capsys.readouterr().out
    ift = read_jsonl(str(tmp_path / "ift.jsonl"))
    assert ift == [dict(id="math:0", source="math", question="What is 1+1?",
                        solution="Step 1: We add.\nStep 2: So $1+1=\\boxed{2}$.", answer="2")]
    assert len(read_jsonl(str(tmp_path / "eft.jsonl"))) == 4
    assert os.path.exists(tmp_path / "eft.jsonl.config.json")
    msd.main()
    assert capsys.readouterr().out.count("exists, skipping") == 2


def test_numina_without_hub_is_a_clear_data_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed / unreachable: same message path
    with pytest.raises(msd.DataError, match="--numina 3: cannot read"):
        msd.load_numina("AI-MO/NuminaMath-CoT", 3)
