"""
The paper's comparisons as commands: the outcome-based SRLM baseline (generate.py --mode srlm: the 5-point score
parser, its pairing rule, its pairs trained by train_step_dpo.py unchanged, its EFT data) and test-time scaling
(evaluate.py --search: the loop's own search, chosen steps equal to generate.py's).

    python -m pytest tests/test_comparisons.py -q
"""

import json
import os
import random
import statistics
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, ROOT)
import evaluate  # noqa: E402
import generate  # noqa: E402
import make_pairs  # noqa: E402
import train_sft  # noqa: E402
import train_step_dpo  # noqa: E402
from common import DataError, parse_score, read_jsonl  # noqa: E402
from prepare import synthetic  # noqa: E402


def run(monkeypatch, script, *argv):
    monkeypatch.setattr(sys, "argv", [script.__name__ + ".py", *map(str, argv)])
    script.main()


# ----------------------------------------------------------------------------------------------------------------
# the 5-point score (Yuan et al. 2024, Fig. 2: "Score: <total points>")


@pytest.mark.parametrize("text, score", [
    ("Score: 4", 4), ("Step 1: 9 vs 9, right. Score: 5", 5), ("Score: 0", 0), ("Score: 3.", 3), ("Score:2", 2),
    ("Score: 4.0", 4), ("Score: 4\nScore: 4", 4),                  # valid
    ("Score: 6", None), ("Score: -1", None), ("Score: 3.5", None),  # out of range, not whole
    ("The answer is right.", None), ("Score:", None), ("score 4", None),  # missing
    ("Score: 3/5", None), ("Score: 3 or 4", None), ("Score: 2\nScore: 4", None),  # several
])
def test_parse_score(text, score):
    assert parse_score(text) == score


# ----------------------------------------------------------------------------------------------------------------
# SRLM pairing: highest vs lowest mean score; no pair when they tie


def srlm_node(texts, scores_by_candidate):
    """A --mode srlm node: candidates (whole solutions) and their scorings [(candidate, score or None)]."""
    judged = sorted({t: i for i, t in reversed(list(enumerate(texts)))}.values())
    return dict(round=1, step=1, prefix_steps=[], rolled_back=False, judged=judged, verdicts=[],
                candidates=[dict(text=t, final=True, eos=True, new_tokens=5) for t in texts],
                scorings=[dict(i=i, scoring=k, score=s, raw=f"Score: {s}", new_tokens=3)
                          for i, ss in scores_by_candidate.items() for k, s in enumerate(ss)])


def pairs_of(node):
    generate.srlm_judgment(node)
    tree = dict(id="q", question="Q", prompt="P: Q", mode="srlm", finished=True, stop_reason="answer", steps=[node])
    return make_pairs.make_pairs([tree], min_gap=0)


def test_srlm_pair_is_highest_vs_lowest_mean_and_has_the_step_pair_schema():
    node = srlm_node(["Step 1: a.\nStep 2: b.", "Step 1: c.", "Step 1: d."],
                     {0: [5, 4, 5], 1: [1, 2, None], 2: [3, 3, 3]})
    (pair,), dropped = pairs_of(node)
    assert node["scores"] == [14 / 3, 1.5, 3.0] and node["unparsed"] == 1 and node["outcome"] == "accepted"
    assert (pair["chosen"], pair["rejected"]) == ("Step 1: a.\nStep 2: b.", "Step 1: c.")
    assert (pair["prompt"], pair["prefix"], pair["step"]) == ("P: Q", "", 1)  # the question alone, no steps before
    step_pair = make_pairs.make_pairs([dict(
        id="q", question="Q", prompt="P", finished=True, stop_reason="answer",
        steps=[dict(srlm_node(["x", "y"], {}), outcome="accepted", scores=[2, 0], best=0, worst=1)])])[0][0]
    assert set(pair) == set(step_pair) and set(train_step_dpo.PAIR_FIELDS) <= set(pair)


@pytest.mark.parametrize("texts, scores, reason", [
    (["A", "B"], {0: [3, 4], 1: [4, 3]}, "all solutions scored the same"),          # a tie: no pair
    (["A", "B", "C"], {0: [2], 1: [2], 2: [2]}, "all solutions scored the same"),   # all equal: no pair
    (["A", "A", "A"], {0: [5]}, "one distinct candidate"),                          # one distinct solution
    (["A", "B"], {0: [None, None], 1: [4]}, "one distinct candidate"),              # one scored solution
    (["A", "B"], {0: [None], 1: [None]}, "no solution scored"),                     # nothing parsed
])
def test_srlm_no_pair(texts, scores, reason):
    pairs, dropped = pairs_of(srlm_node(texts, scores))
    assert pairs == [] and dict(dropped) == {reason: 1}


def test_srlm_copies_share_their_score():
    node = srlm_node(["A", "B", "A"], {0: [4], 1: [1]})
    generate.srlm_judgment(node)
    assert node["scores"] == [4, 1, 4] and (node["best"], node["worst"]) == (0, 1)


# ----------------------------------------------------------------------------------------------------------------
# --mode srlm end to end on the tiny model with a scripted generation; its pairs trained on by Step-DPO as they are


QUESTION = "Tom has 5 pens. He buys 2 more. How many pens does Tom have now?"
QUESTIONS = [QUESTION, "Ann has 5 pens. She buys 2 more. How many pens does Ann have now?"]
RIGHT = "Step 1: 2 more: 5 + 2 = 7. The answer is \\boxed{7}."
WRONG = "Step 1: 2 more: 5 + 2 = 8. The answer is \\boxed{8}."


def scripted_generate(prompts, **kwargs):
    """Solutions alternate right / wrong; the judge scores a right solution 5 and a wrong one 1 (or garbles it)."""
    outs = []
    for k, p in enumerate(prompts):
        if "Score the solution" in p:
            text = "Score: 5" if "= 7" in p else "Score: 1" if k % 3 else "no score"
        else:
            text = RIGHT if k % 2 == 0 else WRONG
        outs.append(dict(text=text, eos=True, new_tokens=len(text.split())))
    return outs


def test_srlm_mode_writes_trees_whose_pairs_step_dpo_trains_on(tiny_model_dir, tmp_path, monkeypatch):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(dict(id=f"q{k}", question=q)) + "\n" for k, q in enumerate(QUESTIONS)))
    asked = []

    def fake(model, tokenizer, prompts, max_new_tokens, **kwargs):
        asked.append((len(prompts), max_new_tokens, kwargs["temperature"], len(set(kwargs["seeds"]))))
        return scripted_generate(prompts)
    monkeypatch.setattr(generate, "generate", fake)
    trees_path, pairs_path = tmp_path / "trees.jsonl", tmp_path / "pairs.jsonl"
    run(monkeypatch, generate, "--mode", "srlm", "--model", tiny_model_dir, "--questions", questions,
        "--out", trees_path, "--prompt-reasoning", "reasoning_tiny", "--prompt-srlm-judge", "srlm_judge_tiny",
        "--num-candidates", "4", "--srlm-scorings", "3", "--max-new-tokens", "40", "--judge-max-new-tokens", "9")
    # 2 questions x 4 solutions, then 2 distinct solutions x 3 scorings per question, every draw its own seed
    assert asked == [(8, 40, 0.5, 8), (12, 9, 0.5, 12)]
    trees = read_jsonl(str(trees_path))
    node = trees[0]["steps"][0]
    assert node["judged"] == [0, 1] and node["scores"][:2] == [5.0, 1.0] and node["outcome"] == "accepted"
    assert trees[0]["solution_steps"] == [RIGHT] and trees[0]["stop_reason"] == "answer"
    run(monkeypatch, make_pairs, "--trees", trees_path, "--out", pairs_path, "--min-gap", "0")
    pairs = read_jsonl(str(pairs_path))
    assert [(p["chosen"], p["rejected"], p["prefix"]) for p in pairs] == [(RIGHT, WRONG, "")] * 2
    model_out = tmp_path / "m2"
    run(monkeypatch, train_step_dpo, "--model", tiny_model_dir, "--pairs", pairs_path, "--out", model_out,
        "--lr", "1e-3", "--batch-size", "2", "--grad-accum", "1")
    log = read_jsonl(str(model_out / "train_log.jsonl"))
    assert len(log) == 1 and log[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at step 0


def test_srlm_mode_refuses_a_control_judge(tiny_model_dir, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="--mode srlm scores with the model itself"):
        run(monkeypatch, generate, "--mode", "srlm", "--judge", "random", "--model", tiny_model_dir,
            "--questions", tmp_path / "q.jsonl", "--out", tmp_path / "t.jsonl")


def test_whole_solution_is_scored_and_the_question_masked(tiny):
    """Through Step-DPO's shared loss: log π(solution | question) sums every token of the whole solution, none of
    the prompt's."""
    model, tokenizer = tiny
    solution = "Step 1: 2 more: 5 + 2 = 7.\nStep 2: 3 fewer: 7 - 3 = 4. The answer is \\boxed{4}."
    pair = dict(prompt="Solve step by step. Problem: " + QUESTION, prefix="", chosen=solution, rejected=WRONG,
                chosen_eos=True, rejected_eos=True)
    prefix_ids, chosen_ids, _ = train_step_dpo.tokenize_pair(tokenizer, pair, final_step_eos=True)
    assert tokenizer.decode(chosen_ids[:-1]) == solution and chosen_ids[-1] == tokenizer.eos_token_id
    with torch.no_grad():
        got = train_step_dpo.step_logps(model, [prefix_ids], [chosen_ids], tokenizer.pad_token_id)[0]
        ids = torch.tensor([prefix_ids + chosen_ids])
        token_logps = model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
    n = len(prefix_ids)
    assert got == pytest.approx(token_logps[n - 1:].sum().item(), abs=1e-4)  # every solution token, EOS included
    assert got != pytest.approx(token_logps[n - 2:].sum().item(), abs=1e-4)  # not the prompt's last token
    first_step = len(tokenizer("Step 1: 2 more: 5 + 2 = 7.\n", add_special_tokens=False)["input_ids"])
    assert got != pytest.approx(token_logps[n - 1:n - 1 + first_step].sum().item(), abs=1e-4)  # not one step


# ----------------------------------------------------------------------------------------------------------------
# SRLM EFT data for the tiny model (prepare/synthetic.py --srlm-eft) and M1's SFT on it


def test_solution_score_follows_the_true_step_labels():
    question = "Ann has 9 apples. She buys 3 more. She loses 2. How many apples does Ann have now?"
    right = ["Step 1: 3 more: 9 + 3 = 12.", "Step 2: 2 fewer: 12 - 2 = 10. The answer is \\boxed{10}."]
    assert synthetic.solution_score(question, right) == 5
    assert synthetic.solution_score(question, right[:1]) == 2  # right so far, no answer
    assert synthetic.solution_score(question, ["Step 1: 3 more: 9 + 3 = 13.", right[1]]) == 1
    wrong_answer = "Step 2: 2 fewer: 12 - 2 = 11. The answer is \\boxed{11}."
    assert synthetic.solution_score(question, [right[0], wrong_answer]) == 2
    assert synthetic.solution_score(question, ["I do not know."]) == 0
    assert synthetic.gold_steps(question) == right
    # the SRLM judge checks each step as the step judge checks a candidate, and stops at the first wrong one
    assert synthetic.srlm_judgment(question, right) == (
        "Step 1: 12. Want Step 1: 3 more: 9 + 3: 10 (1), 11 (2), 12 (3). 12 vs 12: 1 1 same, 2 2 same, right. "
        "Step 2: 10. Want Step 2: 2 fewer: 12 - 2: 11 (1), 10 (2). 10 vs 10: 1 1 same, 0 0 same, right. Score: 5")
    assert synthetic.srlm_judgment(question, [right[0], wrong_answer, right[1]]).endswith(
        "Step 2: 11. Want Step 2: 2 fewer: 12 - 2: 11 (1), 10 (2). 11 vs 10: 1 1 same, 1 0 differ, wrong. Score: 2")
    assert synthetic.srlm_judgment(question, ["I do not know."]) == (
        "Step 1: no result. Want Step 1: 3 more: 9 + 3: 10 (1), 11 (2), 12 (3). no result, wrong. Score: 0")
    assert synthetic.srlm_judgment(question, right + [right[1]]).endswith("Step 3: 10. Want none, wrong. Score: 3")
    assert synthetic.srlm_judgment(question, right[:1], check="quote") == (
        'Step 1: 12. Want "She buys 3 more." Step 1: 3 more: 9 + 3: 10 (1), 11 (2), 12 (3). '
        "12 vs 12: 1 1 same, 2 2 same, right. Score: 2")
    assert synthetic.srlm_judgment(question, right, check="vs") == (  # the first design's whole-number check
        "Step 1: 12 vs 12, right. Step 2: 10 vs 10, right. Score: 5")
    # --step-reason sentence: each step copies the question's sentence before its equation; the judge counts that out
    copied = synthetic.gold_steps(question, "sentence")
    assert copied == ["Step 1: She buys 3 more: 9 + 3 = 12.",
                      "Step 2: She loses 2: 12 - 2 = 10. The answer is \\boxed{10}."]
    assert synthetic.solution_score(question, copied) == 5
    assert synthetic.srlm_judgment(question, copied[:1], step_reason="sentence") == (
        "Step 1: 12. Want Step 1: She buys 3 more: 9 + 3: 10 (1), 11 (2), 12 (3). 12 vs 12: 1 1 same, 2 2 same, "
        "right. Score: 2")
    assert synthetic.srlm_judgment(question, copied, check="reread", step_reason="sentence") == (
        "Step 1: 12. Read 1: She buys 3 more. Want Step 1: She buys 3 more: 9 + 3: 10 (1), 11 (2), 12 (3). "
        "12 vs 12: 1 1 same, 2 2 same, right. Step 2: 10. Read 2: She loses 2. Want Step 2: She loses 2: 12 - 2: "
        "11 (1), 10 (2). 10 vs 10: 1 1 same, 0 0 same, right. Score: 5")
    # the step judge's EFT target counts out and compares with the same pieces
    eft = synthetic.judgment(right[1], right[1], wrong_answer, "A")
    assert "Want Step 2: 2 fewer: 12 - 2: 11 (1), 10 (2). A: 10 vs 10: 1 1 same, 0 0 same, right." in eft
    # --judgment-check quote: the question's sentence of the step, copied before the count
    told = [synthetic.step_sentence(question, 1), synthetic.step_sentence(question, 2)]
    eft = synthetic.judgment(right[1], wrong_answer, right[1], "B", "quote", told)
    assert eft == ('A: 11. B: 10. Want "She loses 2." Step 2: 2 fewer: 12 - 2: 11 (1), 10 (2). '
                   "A: 11 vs 10: 1 1 same, 1 0 differ, wrong. B: 10 vs 10: 1 1 same, 0 0 same, right. [[B]]")
    rng = random.Random(0)
    start, chain = synthetic.sample_problem(rng, 12, 9, 2, 4, "+-", 20)
    q, steps, facts, _ = synthetic.render(rng, start, chain)
    record = synthetic.make_eft(rng, "e", q, steps, facts, chain, "A", "quote")
    k = len(record["previous_steps"])  # the judged step is step k + 1: the question's sentence k + 1 (after the first)
    assert f'Want "{q.split(". ")[k + 1].rstrip(".")}.' in record["judgment"]


def test_srlm_eft_is_optional_and_leaves_the_default_set_unchanged(synthetic_dir, tmp_path, monkeypatch):
    out = tmp_path / "data"
    argv = ["--out-dir", out, "--num-ift", "300", "--num-eft", "200", "--num-questions", "6,6,6", "--num-dev", "20",
            "--num-test", "20", "--num-eft-test", "20"]
    run(monkeypatch, synthetic, *argv, "--srlm-eft", "40")
    for name in sorted(os.listdir(synthetic_dir)):
        if name != "config.json":  # holds --out-dir
            assert (out / name).read_bytes() == open(os.path.join(synthetic_dir, name), "rb").read(), name
    records = read_jsonl(str(out / "srlm_eft.jsonl"), train_sft.SRLM_EFT_FIELDS)
    assert len(records) == 40 and len(read_jsonl(str(out / "srlm_eft_test.jsonl"))) == 20
    assert sum(r["score"] == 5 for r in records) == 20  # half right
    for r in records:
        assert parse_score(r["judgment"]) == r["score"] == synthetic.solution_score(r["question"],
                                                                                   r["response"].split("\n"))
    held_out = {r["question"] for name in ("test", "dev", "eft_test", "eft_dev")
                for r in read_jsonl(str(out / f"{name}.jsonl"))}
    assert not held_out & {r["question"] for r in records}


def test_srlm_eft_with_the_chain_judgment_rereads(tmp_path, monkeypatch):
    """The chain's reading is written for one step's judgment: with --judgment-check chain (the loop's default) the
    whole-solution judge's examples reread each step's sentence, as with --judgment-check reread."""
    out = tmp_path / "data"
    run(monkeypatch, synthetic, "--out-dir", out, "--num-ift", "20", "--num-eft", "20", "--num-questions", "2,2,2",
        "--num-dev", "4", "--num-test", "4", "--num-eft-test", "4", "--judgment-check", "chain", "--srlm-eft", "10")
    records = read_jsonl(str(out / "srlm_eft.jsonl"), train_sft.SRLM_EFT_FIELDS)
    assert len(records) == 10
    for r in records:
        assert r["judgment"] == synthetic.srlm_judgment(r["question"], r["response"].split("\n"), "reread", "sentence")
        assert "Read 1: " in r["judgment"]


def test_sft_on_srlm_eft_masks_the_prompt(tiny):
    _, tokenizer = tiny
    record = dict(question=QUESTION, response=RIGHT, judgment="Step 1: 7 vs 7, right. Score: 5")
    template = "Score the solution from 0 to 5.\n{question}\n{response}"
    [(ids, mask)] = train_sft.build_examples(tokenizer, [], [], "{problem}", "{context}", 512, [record], template)
    response = tokenizer(record["judgment"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids[-len(response):] == response and mask == [0] * (len(ids) - len(response)) + [1] * len(response)
    assert RIGHT in tokenizer.decode(ids[:-len(response)])  # the solution is in the masked prompt


def test_sft_rejects_a_malformed_srlm_eft_record_before_loading_a_model(synthetic_dir, tmp_path, monkeypatch):
    bad = tmp_path / "srlm_eft.jsonl"
    bad.write_text(json.dumps(dict(question="q", response="r", judgment="Score: 1")) + "\n"
                   + json.dumps(dict(question="q", response=["r"], judgment="Score: 1")) + "\n")
    monkeypatch.setattr(train_sft, "load_for_training", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(DataError, match=r"srlm_eft.jsonl:2: field 'response' must be str"):
        run(monkeypatch, train_sft, "--model", "m0", "--ift", os.path.join(synthetic_dir, "ift.jsonl"),
            "--srlm-eft", bad, "--out", tmp_path / "m1")


# ----------------------------------------------------------------------------------------------------------------
# evaluate.py --search: the loop's own search at test time


SEARCH = ["--prompt-reasoning", "reasoning_tiny", "--prompt-judge", "judge_tiny", "--num-candidates", "3",
          "--max-steps", "4", "--max-step-tokens", "16", "--judge", "random", "--seed", "7"]


def test_search_eval_chooses_the_steps_the_loop_accepts(tiny_model_dir, synthetic_dir, tmp_path, monkeypatch):
    questions = os.path.join(synthetic_dir, "questions1.jsonl")
    trees_path, out = tmp_path / "trees.jsonl", tmp_path / "eval"
    run(monkeypatch, generate, "--model", tiny_model_dir, "--questions", questions, "--out", trees_path, *SEARCH)
    run(monkeypatch, evaluate, "--search", "--model", tiny_model_dir, "--data", questions, "--out-dir", out, *SEARCH,
        "--batch-size", "4")
    trees, records = read_jsonl(str(trees_path)), read_jsonl(str(out / "questions1.search.jsonl"))
    assert [r["id"] for r in records] == [t["id"] for t in trees]
    assert [r["output"] for r in records] == ["\n".join(t["solution_steps"]) for t in trees]
    assert any(t["solution_steps"] for t in trees)
    assert [r["candidate_tokens"] for r in records] == \
        [sum(c["new_tokens"] for n in t["steps"] for c in n["candidates"]) for t in trees]
    assert all(r["judge_tokens"] == 0 and r["output_tokens"] == r["candidate_tokens"] for r in records)  # coin flips
    summary = json.loads((out / "questions1.search.summary.json").read_text())
    assert summary["n"] == 6 and summary["accuracy"] == sum(r["correct"] for r in records) / 6
    assert summary["num_candidates"] == 3 and summary["search"] is True
    assert summary["mean_candidate_tokens"] == sum(r["candidate_tokens"] for r in records) / 6
    assert not (out / "questions1.jsonl").exists()  # greedy results are not touched
    with pytest.raises(DataError, match=r"--num-candidates 3 -> 2"):  # other flags: another run's results
        run(monkeypatch, evaluate, "--search", "--model", tiny_model_dir, "--data", questions, "--out-dir", out,
            *SEARCH, "--num-candidates", "2")


def test_search_eval_counts_the_judge_tokens(tiny_model_dir, synthetic_dir, tmp_path, monkeypatch):
    import modeling
    texts = []

    def judge_pairs(model, tokenizer, template, items, *args, **kwargs):
        texts.extend(f"B is {k} [[A]]" for k in range(len(items)))
        return [("A", t) for t in texts[-len(items):]]
    monkeypatch.setattr(modeling, "judge_pairs", judge_pairs)
    out = tmp_path / "eval"
    run(monkeypatch, evaluate, "--search", "--model", tiny_model_dir, "--data",
        os.path.join(synthetic_dir, "questions1.jsonl"), "--out-dir", out, *SEARCH, "--judge", "model", "--limit", "2")
    _, tokenizer = modeling.load_model(tiny_model_dir)
    records = read_jsonl(str(out / "questions1.search.jsonl"))
    judge_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert sum(r["judge_tokens"] for r in records) == judge_tokens > 0


# ----------------------------------------------------------------------------------------------------------------
# report.py: runs side by side, greedy vs search


def write_eval_summaries(run_dir, accuracies):
    """A run's iter<t>/eval/test.summary.json with these accuracies (M1, M2, ...); returns the eval folders."""
    folders = []
    for t, acc in enumerate(accuracies):
        folder = run_dir / f"iter{t}" / "eval"
        folder.mkdir(parents=True)
        (folder / "test.summary.json").write_text(json.dumps(dict(
            dataset="test", n=100, accuracy=acc, accuracy_se=0.05, steps_per_solution=2.0, mean_output_tokens=30)))
        folders.append(folder)
    return folders


def test_report_compares_runs_and_greedy_with_search(tmp_path, monkeypatch, capsys):
    import report
    for run_name, accuracies in [("psrlm", [0.5, 0.6]), ("srlm", [0.5, 0.55])]:
        for folder, acc in zip(write_eval_summaries(tmp_path / run_name, accuracies), accuracies):
            if run_name == "psrlm":
                (folder / "test.search.summary.json").write_text(json.dumps(dict(
                    dataset="test", n=100, accuracy=acc + 0.1, accuracy_se=0.05, mean_candidate_tokens=400,
                    mean_judge_tokens=900)))
    run(monkeypatch, report, "--run", tmp_path / "psrlm", "--run", tmp_path / "srlm")
    out = capsys.readouterr().out
    assert "| psrlm | 50.0 ± 5.0 | 60.0 ± 5.0 |" in out and "| srlm | 50.0 ± 5.0 | 55.0 ± 5.0 |" in out
    assert "| psrlm | M2 | 60.0 ± 5.0 | 30 | 70.0 ± 5.0 | 400 | 900 |" in out  # greedy vs search, M2
    assert "| srlm | M1 |" not in out.split("greedy %")[1]  # no search results: no row
    assert (tmp_path / "comparison.png").stat().st_size > 1000
    rows = json.loads((tmp_path / "psrlm" / "summary.json").read_text())
    assert rows[0]["accuracy"] == 0.5 and rows[0]["search_accuracy"] == 0.6  # the greedy row is not the search's


def test_report_pools_seed_replicates(tmp_path, monkeypatch, capsys):
    """default, default-seed1, default-seed2 (SEED=N bash iterate.sh) -> one row: means and per-seed gains."""
    import report
    for run_name, accuracies in [("default", [0.40, 0.46]), ("default-seed1", [0.42, 0.44]),
                                 ("default-seed2", [0.38, 0.47]), ("random", [0.40, 0.35])]:
        write_eval_summaries(tmp_path / run_name, accuracies)
    run(monkeypatch, report, *[arg for name in ["default", "default-seed1", "default-seed2", "random"]
                                for arg in ("--run", tmp_path / name)])
    out = capsys.readouterr().out
    # gains 6, 2, 9: mean 5.67, sample sd 3.51, se 2.03; "random" has one seed: no pooled row
    assert "| default | 3 | 40.0 | 45.7 | +6.0, +2.0, +9.0 | +5.7 ± 2.0 |" in out
    assert "| random | 1 |" not in out
    # a seed whose last test evaluation is missing (deleted to redo it; its judge's is there): "-" there, the others
    # still pooled
    folder = tmp_path / "default-seed2" / "iter1" / "eval"
    (folder / "judge_eval.summary.json").write_text(json.dumps(dict(judge_accuracy=0.99, judge_accuracy_se=0.01)))
    (folder / "test.summary.json").unlink()
    run(monkeypatch, report, *[arg for name in ["default", "default-seed1", "default-seed2"]
                                for arg in ("--run", tmp_path / name)])
    assert "| default | 3 | 40.0 | - | +6.0, +2.0, - | +4.0 ± 2.0 |" in capsys.readouterr().out


def test_report_gain_over_m1_has_a_paired_standard_error(tmp_path, monkeypatch, capsys):
    """The gain over M1 on the same problems: mean of the per-problem differences, se = their sd / sqrt(n)."""
    import report
    assert report.paired_gain(dict(a=1, b=0, c=0, d=1), dict(a=1, b=1, c=1, d=0, e=1)) == \
        pytest.approx((0.25, statistics.stdev([0, 1, 1, -1]) / 2))  # e: not met by M1, left out
    first = [i % 2 == 0 for i in range(40)]   # M1 right on 20 of 40 problems
    last = [i % 4 != 3 for i in range(40)]    # M2 right on 30: 10 more, none lost -> +25 points, se 6.9
    for folder, correct in zip(write_eval_summaries(tmp_path / "run", [0.5, 0.75]), [first, last]):
        (folder / "test.jsonl").write_text("".join(json.dumps(dict(id=f"q{i}", correct=c)) + "\n"
                                                   for i, c in enumerate(correct)))
    run(monkeypatch, report, "--run", tmp_path / "run")
    out = capsys.readouterr().out
    assert "| M1 | 50.0 ± 5.0 | - |" in out and "| M2 | 75.0 ± 5.0 | +25.0 ± 6.9 |" in out


def test_report_checks_srlm_scores_against_true_labels():
    """In an SRLM tree, verification = how often the higher mean score goes to the right whole solution."""
    import report
    q = "Tom has 5 pens. He buys 4 more. He loses 2. How many pens does Tom have now?"
    right = "Step 1: 4 more: 5 + 4 = 9.\nStep 2: 2 fewer: 9 - 2 = 7. The answer is \\boxed{7}."
    wrong = "Step 1: 4 more: 5 + 4 = 9.\nStep 2: 2 fewer: 9 - 2 = 6. The answer is \\boxed{6}."
    wrong2 = "Step 1: 4 more: 5 + 4 = 10.\nStep 2: 2 fewer: 10 - 2 = 8. The answer is \\boxed{8}."
    node = dict(step=1, candidates=[dict(text=t) for t in (right, wrong, wrong2, right + " ")],
                scores=[4.0, 5.0, 3.0, None], verdicts=[])
    check = report.verdict_check([dict(question=q, mode="srlm", steps=[node])])
    # right vs wrong with both scored: (0,1) the wrong one scored higher, (0,2) the right one; 3 has no score
    assert check == dict(search_generation=0.5, search_verification=0.5, search_right_wins=1, search_wrong_wins=1)
    node["scores"] = [4.0, 4.0, 3.0, 5.0]  # a tie counts nowhere; 3 (right) beats both wrong ones
    check = report.verdict_check([dict(question=q, mode="srlm", steps=[node])])
    assert (check["search_right_wins"], check["search_wrong_wins"]) == (3, 0)


def test_step_error_kind_names_the_first_wrong_piece_and_report_counts_them():
    import report
    q = "Tom has 5 pens. He buys 4 more. He loses 2. How many pens does Tom have now?"
    kind = lambda k, step: synthetic.step_error_kind(q, k, step)
    assert kind(1, "Step 1: 4 more: 5 + 4 = 9.") is None
    assert kind(1, "Step 1: 4 more: 5 + 4 = 10.") == "arithmetic"
    assert kind(2, "Step 2: 2 more: 9 + 2 = 11. The answer is \\boxed{11}.") == "operation"  # "loses 2" read as more
    assert kind(2, "Step 2: 2 more: 9 + 2 = 12. The answer is \\boxed{12}.") == "operation"  # the first wrong piece
    assert kind(2, "Step 2: 5 fewer: 9 - 5 = 4. The answer is \\boxed{4}.") == "operand"
    assert kind(2, "Step 2: 2 fewer: 8 - 2 = 6. The answer is \\boxed{6}.") == "copy"
    assert kind(2, "Step 2: 2 fewer: 9 - 2 = 7.") == "format"  # the last step without its boxed answer
    assert kind(3, "Step 3: 1 more: 7 + 1 = 8.") == "format"  # a step too many
    assert kind(1, "I think 9.") == "format"
    # report.py: the wrong greedy solutions by their first wrong step; the pairs by their wrong step
    right2 = "Step 2: 2 fewer: 9 - 2 = 7. The answer is \\boxed{7}."
    evals = [dict(question=q, correct=True, output="Step 1: 4 more: 5 + 4 = 9.\n" + right2),
             dict(question=q, correct=False, output="Step 1: 4 more: 5 + 4 = 10.\nStep 2: 2 fewer: 10 - 2 = 8."),
             dict(question=q, correct=False, output="Step 1: 4 more: 5 + 4 = 9.\nStep 2: 2 more: 9 + 2 = 11."),
             dict(question=q, correct=False, output="Step 1: 4 more: 5 + 4 = 9.")]  # stops early
    pairs = [dict(question_id="q", step=2, chosen=right2, rejected="Step 2: 2 more: 9 + 2 = 11."),
             dict(question_id="q", step=2, chosen="Step 2: 2 more: 9 + 2 = 11.", rejected=right2),
             dict(question_id="q", step=1, chosen="Step 1: 4 more: 5 + 4 = 9.", rejected="Step 1: 4 more: 5 + 4 = 8."),
             dict(question_id="q", step=1, chosen="Step 1: 4 more: 5 + 4 = 8.", rejected="Step 1: 4 more: 5 + 4 = 7.")]
    assert report.error_kinds(evals, pairs, {"q": q}) == dict(
        greedy_error_kinds={"arithmetic": 1, "operation": 1, "format": 1},
        pair_error_kinds=dict(right_over_wrong={"operation": 1, "arithmetic": 1}, wrong_over_right={"operation": 1}))
    assert report.error_kinds(evals, pairs, {"q": "What is 2 + 2?"}) == {}  # not the synthetic task
