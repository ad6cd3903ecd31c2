"""
The self-judged step search: verdict parsing, win counts (Eqs. 1-5) on a hand-made verdict matrix, candidate
judging with dedupe and position bias, the search rules of §3.3 (accept, roll back on a tie, stop), pair extraction,
and the whole search loop on the tiny model with a fake judge.

    python -m pytest tests/test_search.py -q
"""

import argparse
import os
import random
import re
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import common  # noqa: E402
import generate  # noqa: E402
import judge  # noqa: E402
import make_pairs  # noqa: E402
import modeling  # noqa: E402
import report  # noqa: E402
import step_search  # noqa: E402
from common import BOXED, join_steps, judge_candidates, judge_context, load_prompt, read_jsonl, write_jsonl  # noqa: E402
from conftest import check_pad_is_eos_search, pad_is_eos_search  # noqa: E402
from modeling import load_model  # noqa: E402
from prepare.synthetic import apply  # noqa: E402

ARITHMETIC = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def correct(step):
    m = ARITHMETIC.search(step)
    if not m:
        return False
    a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
    return apply(op, a, b) == c


def consistent_judge(calls):
    """A fake judge_pairs: right arithmetic beats wrong, then the larger text wins; never looks at the position."""
    def judge_pairs(model, tokenizer, template, items, *args, **kwargs):
        calls.append(list(items))
        key = lambda s: (correct(s), s)  # noqa: E731
        return [("A" if key(a) > key(b) else "B", f"fake [[{'A' if key(a) > key(b) else 'B'}]]") for _, a, b in items]
    return judge_pairs


def always_a(model, tokenizer, template, items, *args, **kwargs):
    return [("A", "[[A]]") for _ in items]


def model_verdicts(fake_judge_pairs, template="t"):
    """The model judge's verdict function (modeling.verdict_fn) with a fake in place of the model's generation."""
    return lambda comparisons: fake_judge_pairs(None, None, template,
                                                [(judge_context(q, prev), a, b) for q, prev, a, b in comparisons])


# ----------------------------------------------------------------------------------------------------------------
# verdicts and win counts


@pytest.mark.parametrize("text, verdict", [
    ("[[A]]", "A"), ("A is right, B is wrong. [[B]]", "B"), ("[[A]] no wait [[B]]", None), ("A", None),
    ("[[C]]", None), ("[A]", None), ("", None), ("[[A]] and again [[A]]", "A"),
])
def test_parse_verdict(text, verdict):
    assert common.parse_verdict(text) == verdict


def test_pairs_to_judge_both_orders():
    assert common.pairs_to_judge(3, 1) == [(0, 1, "ab"), (0, 2, "ab"), (1, 2, "ab")]
    both = common.pairs_to_judge(4, 2)
    assert len(both) == 12 and (1, 0, "ba") in both and (3, 2, "ba") in both
    assert {(min(i, j), max(i, j)) for i, j, _ in both} == {(i, j) for i in range(4) for j in range(i + 1, 4)}


# w = 4, both orders. (i, j, verdict): i shown as A, j as B. Candidate 2 wins all its comparisons (one verdict
# unparseable), 3 loses all; 0 vs 1 shows position bias (A both times), 0 and 1 both beat 3.
MATRIX = [(0, 1, "A"), (1, 0, "A"), (0, 2, "B"), (2, 0, "A"), (0, 3, "A"), (3, 0, "B"),
          (1, 2, "B"), (2, 1, None), (1, 3, "A"), (3, 1, "B"), (2, 3, "A"), (3, 2, "B")]


def test_win_counts_and_best_worst_on_a_hand_made_matrix():
    scores = common.win_counts(4, MATRIX)
    assert scores == [3, 3, 5, 0]
    assert sum(scores) == 12 - 1  # the unparseable verdict gives nobody a win
    assert common.best_and_worst(scores) == (2, 3)
    verdicts = [dict(i=i, j=j, verdict=v) for i, j, v in MATRIX]
    assert common.order_disagreement(verdicts) == pytest.approx(1 / 5)  # (1,2) has a None: only 5 pairs count


def test_best_and_worst_ties():
    assert common.best_and_worst([3, 5, 5, 0]) == (1, 3)  # first index among equals
    assert common.best_and_worst([2, 0, 2, 0]) == (0, 1)
    assert common.best_and_worst([3, 3, 3, 3]) == (None, None)
    assert common.best_and_worst([0]) == (None, None)


# ----------------------------------------------------------------------------------------------------------------
# judging candidates


JOB = ("Ann has 9 pens. She then has 2 times as many.", ["Step 1: 9 pens."],
       ["Step 2: 9 * 2 = 18.", "Step 2: 9 + 2 = 12.", "Step 2: 9 * 2 = 18.", "Step 2: 9 * 2 = 17."])


def test_judge_candidates_dedupes_and_scores():
    calls = []
    (res,) = judge_candidates([JOB], model_verdicts(consistent_judge(calls)), orders=2)
    assert res["judged"] == [0, 1, 3]
    assert len(calls) == 1 and len(calls[0]) == 6 == len(res["verdicts"])  # 3 distinct -> 3 pairs x 2 orders
    assert all(a != b for _, a, b in calls[0])  # identical texts are never compared
    assert all(v["i"] != 2 and v["j"] != 2 for v in res["verdicts"])
    assert calls[0][0][0] == "Ann has 9 pens. She then has 2 times as many.\nStep 1: 9 pens."
    # 0 (right) beats 1 and 3 in both orders: 4 wins; "+ 2 = 12" > "* 2 = 17" as text: 2 wins; 3: none
    assert res["scores"] == [4, 2, 4, 0]  # the duplicate shares its first copy's score
    assert (res["best"], res["worst"], res["tie"], res["unparsed"]) == (0, 3, False, 0)
    assert common.order_disagreement(res["verdicts"]) == 0.0

    calls.clear()
    (full,) = judge_candidates([JOB], model_verdicts(consistent_judge(calls)), orders=1, dedupe=False)
    assert full["judged"] == [0, 1, 2, 3] and len(calls[0]) == 6  # 4 candidates, one order
    assert common.order_disagreement(full["verdicts"]) is None  # nothing was judged in both orders


def test_single_distinct_and_empty_and_several_jobs_in_one_call():
    calls = []
    same = ("q", [], ["Step 1: 1 + 1 = 2."] * 3)
    empty = ("q", [], [])
    single, none, full = judge_candidates([same, empty, JOB], model_verdicts(consistent_judge(calls)), orders=2)
    assert len(calls) == 1 and len(calls[0]) == 6  # all jobs' comparisons in one batched call
    assert (single["best"], single["worst"], single["tie"], single["verdicts"]) == (0, None, False, [])
    assert single["scores"] == [0, 0, 0]
    assert (none["best"], none["worst"], none["tie"]) == (None, None, False)
    assert full["best"] == 0 and full["worst"] == 3


def test_position_biased_judge_ties_everything():
    (res,) = judge_candidates([JOB], model_verdicts(always_a), orders=2)
    assert res["scores"] == [2, 2, 2, 2] and res["tie"] is True
    assert res["best"] is None and res["worst"] is None
    assert common.order_disagreement(res["verdicts"]) == 1.0
    (one_order,) = judge_candidates([JOB], model_verdicts(always_a), orders=1)  # one order hides the bias
    assert one_order["tie"] is False and one_order["scores"] == [2, 1, 2, 0]


def test_random_judge_is_seeded_coin_flips():
    first = judge_candidates([JOB] * 5, common.random_verdicts(random.Random(3)))
    again = judge_candidates([JOB] * 5, common.random_verdicts(random.Random(3)))
    assert first == again
    for res in first:
        assert len(res["verdicts"]) == 6 and res["unparsed"] == 0
        assert sum(res["scores"][i] for i in res["judged"]) == 6
    assert len({tuple(r["scores"]) for r in first}) > 1  # the flips differ between jobs


def test_oracle_judge_prefers_the_right_step_and_flips_coins_between_equals():
    q = "Tom has 5 pens. He buys 4 more. He loses 2. How many pens does Tom have now?"
    cands = ["Step 1: 4 more: 5 + 4 = 10.", "Step 1: 4 more: 5 + 4 = 9.", "Step 1: 4 more: 5 - 4 = 1.",
             "Step 1: 4 more: 5 + 4 = 9. "]  # two right (different text), two wrong
    (res,) = judge_candidates([(q, [], cands)], common.oracle_verdicts(random.Random(0)), orders=2)
    assert all(v["raw"] == "oracle" for v in res["verdicts"]) and res["unparsed"] == 0
    # each right step wins all 4 comparisons against the wrong ones; the right pair shares 2 wins by coin flips
    assert res["scores"][1] + res["scores"][3] == 8 + 2 and res["scores"][0] + res["scores"][2] == 2
    assert res["best"] in (1, 3) and res["worst"] in (0, 2)
    for v in res["verdicts"]:
        winner = {"A": v["i"], "B": v["j"]}[v["verdict"]]
        if {v["i"], v["j"]} & {1, 3} and not {v["i"], v["j"]} <= {1, 3}:
            assert winner in (1, 3)


def test_report_checks_the_judge_against_true_labels():
    q = "Tom has 5 pens. He buys 4 more. He loses 2. How many pens does Tom have now?"
    cands = [dict(text=t) for t in ["Step 1: 4 more: 5 + 4 = 9.", "Step 1: 4 more: 5 + 4 = 10.",
                                      "Step 1: 4 more: 5 + 4 = 9. "]]
    verdicts = [dict(i=0, j=1, verdict="B"), dict(i=1, j=0, verdict="B"), dict(i=0, j=2, verdict="B"),
                dict(i=1, j=2, verdict=None)]
    check = report.verdict_check([dict(question=q, steps=[dict(step=1, candidates=cands, verdicts=verdicts)])])
    # right-vs-wrong comparisons: (0,1) wrong won, (1,0) right won; (0,2) is right vs right; None counts nowhere.
    # generation: 2 of the 3 sampled candidates are right; verification: the right one won 1 of its 2 comparisons
    assert check == dict(search_generation=2 / 3, search_verification=0.5, search_b_share=0.75, search_right_wins=1,
                         search_wrong_wins=1)
    assert report.verdict_check([dict(question="Find $x$.", steps=[])]) == {}  # no steps: nothing to check
    assert report.pair_label_check([], {}) == {}  # no pairs: nothing checked (not "0 right, 0 wrong")
    right, wrong, reworded = "Step 1: 4 more: 5 + 4 = 9.", "Step 1: 4 more: 5 + 4 = 10.", "Step 1: 3 more: 5 + 4 = 9."
    pairs = [dict(question_id="q", step=1, chosen=c, rejected=r) for c, r in
             [(right, wrong), (right, wrong), (wrong, right), (right, reworded), (wrong, "Step 1: 5 - 4 = 1.")]]
    assert report.pair_label_check(pairs, {"q": q}) == dict(pairs_right_over_wrong=2, pairs_wrong_over_right=1,
                                                             pairs_both_right=1, pairs_both_wrong=1)
    eft = [dict(id="a", step_a="Step 1: 4 more: 5 + 4 = 9.", step_b="Step 1: 4 more: 5 + 4 = 10.", error="arithmetic"),
           dict(id="b", step_a="Step 1: 4 more: 5 + 4 = 9.", step_b="Step 1: 4 more: 5 - 4 = 1.", error="operation"),
           dict(id="c", step_a="Step 1: 4 more: 5 + 4 = 7.", step_b="Step 1: 4 more: 5 + 4 = 9.", error="arithmetic")]
    rows = [dict(id="a", correct=True), dict(id="b", correct=False), dict(id="c", correct=False)]
    assert report.judge_gap_check(rows, eft) == dict(judge_near_accuracy=0.5, judge_near_n=2, judge_far_accuracy=0.0,
                                                     judge_far_n=1,
                                                     judge_error_kinds=dict(arithmetic=[1, 2], operation=[0, 1]))
    no_kinds = [{k: v for k, v in r.items() if k != "error"} for r in eft]  # EFT data without kinds: no breakdown
    assert "judge_error_kinds" not in report.judge_gap_check(rows, no_kinds)
    assert report.judge_gap_check([dict(id="a", correct=True)], [dict(id="a", step_a="x = 2", step_b="y")]) == {}
    # a rereading judge: its wrong verdicts counted by whether "Read k:" copied the wrong step's sentence
    q = "Leo has 7 pens. He gets 3 more. He finds 2 more. How many pens does Leo have now?"
    right, misread = "Step 2: He finds 2 more: 10 + 2 = 12.", "Step 2: He finds 4 more: 10 + 4 = 14."
    wrong_sum = "Step 2: He finds 2 more: 10 + 2 = 13."
    eft = [dict(id=i, question=q, step_a=a, step_b=b)
           for i, a, b in [("a", misread, right), ("b", right, misread), ("c", wrong_sum, right),
                           ("d", right, misread)]]
    reads = lambda second: f"A: 14. B: 12. Read 1: He gets 3 more. Read 2: {second}. Want Step 2: ..."
    rows = [dict(id="a", label="B", correct=False, raw=reads("He finds 4 more") + " [[A]]"),  # copied A's sentence
            dict(id="b", label="A", correct=False, raw=reads("He finds 2 more") + " [[B]]"),  # read right, still wrong
            dict(id="c", label="B", correct=False, raw=reads("He finds 2 more") + " [[A]]"),  # A's sentence is right
            dict(id="d", label="A", correct=True, raw=reads("He finds 2 more") + " [[A]]")]
    assert report.judge_gap_check(rows, eft)["judge_read_copies"] == [1, 3]
    assert report.reads_the_wrong_step(reads("He finds 4 more"), eft[1], "A")  # B is wrong and was copied
    assert not report.reads_the_wrong_step(reads("He finds 4 more"), eft[1], "B")  # A is wrong: right sentence


def test_judge_pairs_with_the_tiny_model(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    args = search_args(judge_max_new_tokens=6)
    (res,) = judge_candidates([JOB], modeling.verdict_fn(args, model, tokenizer, load_prompt("judge_tiny"), None),
                              orders=2)
    assert len(res["verdicts"]) == 6
    assert all(v["verdict"] == common.parse_verdict(v["raw"]) for v in res["verdicts"])
    assert res["unparsed"] == sum(v["verdict"] is None for v in res["verdicts"])


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_chunked_prefill_generates_the_same_text(tiny_model_dir, temperature):
    """
    --prefill-chunk (HF generate's chunked prefill) only splits the prompt's forward pass: with left-padded prompts of
    different lengths, chunks shorter than the padding, and sampling under one seed, the texts do not change.
    """
    from common import chat_prompt
    from modeling import generate as generate_texts
    model, tokenizer = load_model(tiny_model_dir)
    template = load_prompt("reasoning_tiny")
    questions = ["What is 3 + 4?", "Compute (12 + 7) * 3 - 5 * 2 + 8, then add 40 and subtract 9.", "2 * 9 = ?"]
    prompts = [chat_prompt(tokenizer, template.format(problem=q)) for q in questions]
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert max(lengths) - min(lengths) > 8  # the shortest prompt's whole first chunk is padding

    widths = []  # tokens per forward pass: the chunks show up here, so the flag cannot be silently ignored
    model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)

    def run(chunk):
        model.generation_config.prefill_chunk_size = chunk
        widths.clear()
        torch.manual_seed(0)
        texts = generate_texts(model, tokenizer, prompts, max_new_tokens=24, temperature=temperature, top_p=0.95,
                               one_step=True)
        first_decode_step = widths.index(1) if 1 in widths else len(widths)
        return texts, widths[:first_decode_step]
    whole, prefill = run(None)
    assert prefill == [max(lengths)]
    assert load_model(tiny_model_dir, prefill_chunk=4)[0].generation_config.prefill_chunk_size == 4  # --prefill-chunk
    for chunk in (4, 7):
        texts, prefill = run(chunk)
        assert texts == whole
        assert sum(prefill) == max(lengths) and max(prefill) == chunk
    model.generation_config.prefill_chunk_size = None


# ----------------------------------------------------------------------------------------------------------------
# the search rules (§3.3)


def node(texts, best, worst, tie, eos=False):
    return dict(candidates=[dict(text=t, final=eos or BOXED in t, eos=eos, new_tokens=5) for t in texts],
                best=best, worst=worst, tie=tie, rolled_back=False)


def judged(tree, n, max_steps=20):
    n.update(round=tree["rounds"] + 1, step=len(tree["solution_steps"]) + 1, prefix_steps=list(tree["solution_steps"]))
    tree["steps"].append(n)  # as search() does: the node is in the tree when the rules run
    step_search.apply_judgment(tree, n, max_steps)
    return n


def test_tie_rolls_back_the_previous_step():
    tree = step_search.new_tree("q", dict(question="Q"), "P")
    n1 = judged(tree, node(["s1", "bad1"], 0, 1, False), max_steps=5)
    n2 = judged(tree, node(["bad2", "s2"], 1, 0, False), max_steps=5)
    assert tree["solution_steps"] == ["s1", "s2"] and n1["outcome"] == n2["outcome"] == "accepted"
    n3 = judged(tree, node(["t1", "t2"], None, None, True), max_steps=5)
    assert n3["outcome"] == "tie_rollback"
    assert tree["solution_steps"] == ["s1"]
    assert n2["rolled_back"] is True and n1["rolled_back"] is False and n3["rolled_back"] is False
    assert not tree["finished"]
    n4 = judged(tree, node(["s2b", "s2b"], 0, None, False), max_steps=5)  # one distinct candidate
    assert n4["outcome"] == "single" and n4["step"] == 2 and tree["solution_steps"] == ["s1", "s2b"]
    n5 = judged(tree, node(["u", "v"], None, None, True), max_steps=5)
    assert n4["rolled_back"] is True and n2["rolled_back"] is True and n1["rolled_back"] is False
    assert tree["solution_steps"] == ["s1"] and n5["outcome"] == "tie_rollback"
    assert tree["rounds"] == 5 and tree["finished"] and tree["stop_reason"] == "max_steps"  # roll-backs count


def test_tie_at_step_one_drops_nothing():
    tree = step_search.new_tree("q", dict(question="Q"), "P")
    n1 = judged(tree, node(["a", "b"], None, None, True))
    assert tree["solution_steps"] == [] and n1["rolled_back"] is False and n1["outcome"] == "tie_rollback"
    assert not tree["finished"] and tree["rounds"] == 1


def test_final_candidates_and_stop_reasons():
    tree = step_search.new_tree("q", dict(question="Q"), "P")
    judged(tree, node(["Step 1: 1 + 1 = 2.", "x"], 0, 1, False), max_steps=2)
    judged(tree, node(["Step 2: 2 * 2 = 4. The answer is \\boxed{4}.", "y"], 0, 1, False), max_steps=2)
    assert tree["finished"] and tree["stop_reason"] == "answer"  # the answer wins over max_steps in the same round
    assert len(tree["solution_steps"]) == 2

    tree = step_search.new_tree("q", dict(question="Q"), "P")
    judged(tree, node(["Step 1: done", "Step 1: other"], 0, 1, False, eos=True))
    assert tree["finished"] and tree["stop_reason"] == "eos"

    tree = step_search.new_tree("q", dict(question="Q"), "P")
    judged(tree, node(["a", "b"], 1, 0, False), max_steps=1)
    assert tree["finished"] and tree["stop_reason"] == "max_steps" and tree["solution_steps"] == ["b"]

    tree = step_search.new_tree("q", dict(question="Q"), "P")
    n = judged(tree, node([], None, None, False))
    assert tree["finished"] and tree["stop_reason"] == "empty" and n["outcome"] == "empty"


# ----------------------------------------------------------------------------------------------------------------
# pairs


def pnode(step, rnd, texts, scores, best, worst, outcome="accepted", rolled_back=False, prefix=()):
    return dict(step=step, round=rnd, prefix_steps=list(prefix), candidates=[
        dict(text=t, final=BOXED in t, eos=False, new_tokens=3) for t in texts], scores=scores, best=best,
        worst=worst, outcome=outcome, rolled_back=rolled_back, tie=outcome == "tie_rollback")


def hand_trees():
    s1 = ["S1 good", "S1 mid", "S1 bad"]
    nodes = [
        pnode(1, 1, s1, [4, 2, 0], 0, 2),                                            # pair: good vs bad
        pnode(2, 2, ["S2 a", "S2 b"], [2, 0], 0, 1, rolled_back=True, prefix=["S1 good"]),  # rolled back
        pnode(2, 3, ["S2 c", "S2 d"], [1, 1], None, None, "tie_rollback", prefix=["S1 good"]),
        pnode(2, 4, ["S2 e", "S2 f", "S2 g"], [3, 3, 0], 0, 2, prefix=["S1 good"]),  # tie for best
        pnode(3, 5, ["S3 x \\boxed{4}", "S3 y", "S3 z"], [2, 1, 3], 2, 1, prefix=["S1 good", "S2 e"]),
        pnode(3, 6, ["S3 only"], [0], 0, None, "single", prefix=["S1 good", "S2 e"]),
        pnode(1, 7, s1[::-1], [0, 2, 4], 2, 0),                                      # same pair again
        pnode(2, 8, ["S2 h \\boxed{1}", "S2 i"], [2, 0], 0, 1, prefix=["S1 good"]),
    ]
    other = [pnode(1, 1, s1, [4, 2, 0], 0, 2), pnode(2, 2, ["T a", "T b", "T c"], [4, 1, 1], 0, 1, prefix=["S1 good"])]
    return [dict(id="q1", question="Q1", prompt="P1", steps=nodes, finished=True, stop_reason="answer"),
            dict(id="q2", question="Q2", prompt="P2", steps=other, finished=True, stop_reason="max_steps")]


def test_make_pairs_rules():
    pairs, dropped = make_pairs.make_pairs(hand_trees())
    got = [(p["question_id"], p["step"], p["chosen"], p["rejected"]) for p in pairs]
    assert got == [("q1", 1, "S1 good", "S1 bad"), ("q1", 2, "S2 e", "S2 g"), ("q1", 3, "S3 z", "S3 y"),
                   ("q1", 2, "S2 h \\boxed{1}", "S2 i"), ("q2", 1, "S1 good", "S1 bad"), ("q2", 2, "T a", "T b")]
    assert dropped == {"step discarded by a later roll-back": 1, "all candidates tied (roll-back)": 1,
                       "one distinct candidate": 1, "duplicate pair": 1}
    first = pairs[0]
    assert first["id"] == "q1-step1-round1" and first["prompt"] == "P1" and first["prefix"] == ""
    assert (first["chosen_score"], first["rejected_score"]) == (4, 0)
    assert pairs[2]["prefix"] == join_steps(["S1 good", "S2 e"]) == "S1 good\nS2 e\n"
    assert (pairs[2]["chosen_final"], pairs[2]["rejected_final"]) == (False, False)
    assert (pairs[3]["chosen_final"], pairs[3]["rejected_final"]) == (True, False)
    assert (pairs[3]["chosen_eos"], pairs[3]["rejected_eos"]) == (False, False)  # boxed, but no EOS was emitted
    assert len({p["id"] for p in pairs}) == len(pairs)

    skip, dropped = make_pairs.make_pairs(hand_trees(), ties="skip")
    assert [(p["question_id"], p["step"]) for p in skip] == [("q1", 1), ("q1", 3), ("q1", 2), ("q2", 1)]
    assert dropped["tie for best or worst (--ties skip)"] == 2  # q1 round 4 (best), q2 round 2 (worst)

    gap, dropped = make_pairs.make_pairs(hand_trees(), min_gap=3)
    assert [(p["question_id"], p["chosen"]) for p in gap] == [("q1", "S1 good"), ("q1", "S2 e"), ("q2", "S1 good"),
                                                             ("q2", "T a")]
    assert dropped["score gap below --min-gap 3"] == 2

    finished, dropped = make_pairs.make_pairs(hand_trees(), only_finished=True)
    assert {p["question_id"] for p in finished} == {"q1"} and len(finished) == 4
    assert dropped["search did not finish (--only-finished)"] == 2


def test_rejudged_trees_still_make_pairs(tmp_path, monkeypatch):
    """
    judge.py re-judges a search's trees for make_pairs.py (its docstring). A step accepted in the search may tie
    under the new judge; make_pairs must then give it no pair rather than index the scores with None.
    """
    tree = dict(id="q1", question="Q", prompt="P", finished=True, stop_reason="answer", rounds=1, solution_steps=["a"],
                steps=[pnode(1, 1, ["Step 1: 1 + 1 = 2.", "Step 1: 1 + 1 = 3."], [2, 0], 0, 1)])
    trees_path, out = str(tmp_path / "trees.jsonl"), str(tmp_path / "rejudged.jsonl")
    write_jsonl(trees_path, [tree])
    monkeypatch.setattr(modeling, "judge_pairs", always_a)  # a position-biased judge: every step ties
    monkeypatch.setattr(sys, "argv", ["judge.py", "--model", "unused", "--trees", trees_path, "--out", out])
    monkeypatch.setattr(judge, "load_model", lambda *a, **k: (None, None))
    judge.main()
    (rejudged,) = read_jsonl(out)
    assert rejudged["steps"][0]["tie"] is True and rejudged["steps"][0]["best"] is None
    pairs, dropped = make_pairs.make_pairs([rejudged])
    assert pairs == [] and sum(dropped.values()) == 1


def test_search_stats_measure_position_bias_per_judged_step():
    """Candidate indices restart at 0 in every step: pair (0, 1) of one step is not pair (0, 1) of the next."""
    biased = [dict(i=0, j=1, order="ab", verdict="A"), dict(i=1, j=0, order="ba", verdict="A")]  # winners 0, 1
    fair = [dict(i=0, j=1, order="ab", verdict="B"), dict(i=1, j=0, order="ba", verdict="A")]    # winners 1, 1
    steps = [dict(verdicts=v, outcome="accepted", candidates=[dict(eos=False, final=k == 3)]) for k, v in
             enumerate((biased, fair, fair, fair))]
    tree = dict(id="q", stop_reason="answer", solution_steps=["a"], rounds=4, steps=steps)
    assert common.order_disagreement(biased) == 1.0 and common.order_disagreement(fair) == 0.0
    stats = common.search_stats([tree])
    assert stats["verdicts"] == 8 and stats["unparsed"] == 0
    assert (stats["verdicts_a"], stats["verdicts_b"]) == (5, 3)
    assert (stats["candidates"], stats["candidates_eos"], stats["candidates_final"]) == (4, 0, 1)
    assert stats["order_disagreement"] == pytest.approx(1 / 4)  # one of the four judged pairs disagrees


# ----------------------------------------------------------------------------------------------------------------
# the search loop on the tiny model

TREE_FIELDS = {"id", "question", "prompt", "solution_steps", "finished", "stop_reason", "rounds", "steps"}
NODE_FIELDS = {"round", "step", "prefix_steps", "candidates", "judged", "verdicts", "scores", "best", "worst", "tie",
               "unparsed", "outcome", "rolled_back"}
CANDIDATE_FIELDS = {"text", "final", "eos", "new_tokens"}


def search_args(**kw):
    args = dict(prompt_reasoning="reasoning_tiny", prompt_judge="judge_tiny", num_candidates=3, temperature=0.5,
                top_p=0.95, max_steps=3, max_step_tokens=12, judge_max_new_tokens=8, orders=2, judge="model",
                no_dedupe=False, batch_size=64, seed=0, stop_at_verdict=False)
    args.update(kw)
    return argparse.Namespace(**args)


class Count:
    n = 0

    def update(self, k):
        self.n += k


def check_tree(tree, max_steps):
    assert set(tree) == TREE_FIELDS and tree["finished"]
    assert tree["stop_reason"] in {"answer", "eos", "max_steps", "empty", "too_long"}
    assert 1 <= tree["rounds"] <= max_steps and len(tree["steps"]) == tree["rounds"]
    replay = []  # the accepted steps, rebuilt from the nodes
    for r, n in enumerate(tree["steps"], 1):
        assert set(n) == NODE_FIELDS and n["round"] == r
        assert all(set(c) == CANDIDATE_FIELDS for c in n["candidates"])
        assert n["prefix_steps"] == replay and n["step"] == len(replay) + 1
        if n["outcome"] == "tie_rollback":
            replay = replay[:-1]
        elif n["outcome"] in ("accepted", "single"):
            replay.append(n["candidates"][n["best"]]["text"])
    assert tree["solution_steps"] == replay


def test_search_end_to_end_on_the_tiny_model(tiny_model_dir, synthetic_dir, monkeypatch):
    model, tokenizer = load_model(tiny_model_dir)
    calls = []
    monkeypatch.setattr(modeling, "judge_pairs", consistent_judge(calls))
    records = read_jsonl(os.path.join(synthetic_dir, "questions1.jsonl"))[:2]
    bar = Count()
    trees = generate.search(model, tokenizer, records, ["a", "b"], search_args(), bar)
    assert [t["id"] for t in trees] == ["a", "b"] and bar.n == 2
    for t, r in zip(trees, records):
        check_tree(t, max_steps=3)
        assert t["question"] == r["question"]
        assert t["prompt"] == load_prompt("reasoning_tiny").format(problem=r["question"])
    assert calls  # the judge was asked
    stats = common.search_stats(trees)
    assert stats["questions"] == 2 and stats["rounds"] == sum(t["rounds"] for t in trees)
    assert stats["verdicts"] == sum(len(n["verdicts"]) for t in trees for n in t["steps"]) > 0
    pairs, _ = make_pairs.make_pairs(trees)
    assert len(pairs) == sum(n["outcome"] == "accepted" and not n["rolled_back"] for t in trees for n in t["steps"])


def test_model_without_step_marker_or_answer_stops_at_max_steps(tiny_model_dir, synthetic_dir, monkeypatch):
    model, tokenizer = load_model(tiny_model_dir)
    letters = [tokenizer.convert_tokens_to_ids(c) for c in "xy"]
    assert tokenizer.decode(letters) == "xy"
    bias = torch.zeros(len(tokenizer))
    bias[letters] = 100.0  # the model only ever says x or y: no "Step", no \boxed, no EOS
    handle = model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    calls = []
    monkeypatch.setattr(modeling, "judge_pairs", consistent_judge(calls))
    records = read_jsonl(os.path.join(synthetic_dir, "questions1.jsonl"))[:2]
    try:
        trees = generate.search(model, tokenizer, records, ["a", "b"], search_args(temperature=1.0), Count())
    finally:
        handle.remove()
    for t in trees:
        check_tree(t, max_steps=3)
        assert t["stop_reason"] == "max_steps" and t["rounds"] == 3 and len(t["solution_steps"]) == 3
        for n in t["steps"]:
            assert all(set(c["text"]) <= {"x", "y"} and len(c["text"]) == 12 for c in n["candidates"])
            assert all(not c["final"] and not c["eos"] and c["new_tokens"] == 12 for c in n["candidates"])
            assert n["outcome"] in ("accepted", "single")
            if n["outcome"] == "accepted":  # the fake judge prefers the larger text
                assert n["candidates"][n["best"]]["text"] == max(c["text"] for c in n["candidates"])


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_scripted_search_with_pad_equal_to_eos(tiny_model_dir, pad_is_eos):
    """
    pad = EOS (Qwen2.5's base models, SmolLM2): rows that stopped at the next step marker are padded with the EOS id
    while other rows run on; those candidates did not end the solution, and the search goes on to the answer at
    step 3. Both tokenizer settings must give the same trees (tests/test_real_tokenizer.py: the same with SmolLM2's).
    """
    model, tokenizer = load_model(tiny_model_dir)
    if pad_is_eos:
        tokenizer.pad_token = tokenizer.eos_token
        model.generation_config.pad_token_id = tokenizer.eos_token_id
    assert (tokenizer.pad_token_id == tokenizer.eos_token_id) == pad_is_eos
    check_pad_is_eos_search(**pad_is_eos_search(model, tokenizer, "reasoning_tiny"))


def test_pure_json_stages_import_without_torch():
    """make_pairs.py and report.py are JSON to JSON: they (and common.py) import in a Python that has no torch."""
    import subprocess
    code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
            "import common, make_pairs, report\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
