"""evaluate.py: answer extraction, math-verify grading, native data formats, oracle, resume, shards, judge accuracy."""

import json
import os
import sys
import threading

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import evaluate  # noqa: E402
from common import DataError, read_jsonl  # noqa: E402

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("text, expected", [
    (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"first \boxed{3}, then \boxed{4}", "4"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\fbox{7}", "7"),
    (r"the answer is \boxed 5.", "5."),
    ("no box here", None),
    (r"cut off \boxed{\frac{1}{", None),
])
def test_last_boxed(text, expected):
    assert evaluate.last_boxed(text) == expected


@pytest.mark.parametrize("pred, gold", [
    (r"\frac{1}{2}", "0.5"), (r"\dfrac{3}{4}", r"\frac34"), (r"5 \text{ cm}", "5"), ("x=5", "5"), ("12", "12.0"),
    ("1,000", "1000"), ("50\\%", "50"), ("104.", "104"), (r"\textbf{(073)}", "073"), ("73", "073"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"), ("-1-\\sqrt{3}", "$-1-\\sqrt{3}$"),
])
def test_equivalent(pred, gold):
    assert evaluate.is_equiv(pred, gold)


@pytest.mark.parametrize("pred, gold", [("1/3", "0.33"), ("5", "6"), (None, "5"), ("", "5"), ("5", "")])
def test_not_equivalent(pred, gold):
    assert not evaluate.is_equiv(pred, gold)


def test_is_equiv_off_main_thread():
    # math-verify's signal-based timeout cannot run outside the main thread; is_equiv must still work there
    result = []
    t = threading.Thread(target=lambda: result.append(evaluate.is_equiv(r"\frac{1}{2}", "0.5")))
    t.start()
    t.join()
    assert result == [True]


def test_native_formats(tmp_path):
    gsm = write_lines(tmp_path / "gsm8k.jsonl", [{"question": "q", "answer": "10 * 2 = 20\n#### 1,020"}])
    name, [item] = evaluate.load_benchmark(gsm)
    assert item["gold"] == "1020" and item["solution"].endswith(r"\boxed{1,020}") and item["id"] == "0"
    amc = write_lines(tmp_path / "amc.jsonl", [{"id": 3, "problem": "p", "question": "p", "answer": 12.0}])
    assert evaluate.load_benchmark(amc)[1][0] == dict(id="3", question="p", gold="12",
                                                      solution=r"The final answer is \boxed{12.0}")
    math = write_lines(tmp_path / "math.jsonl", [{"problem": "p", "solution": r"so \boxed{\frac{1}{2}}.",
                                                 "unique_id": "u"}])
    assert evaluate.load_benchmark(math)[1][0]["gold"] == r"\frac{1}{2}"
    oly = write_lines(tmp_path / "oly.jsonl", [{"id": 1, "context": "c", "question": "q", "final_answer": ["$4$"],
                                               "solution": ["s"]}])
    item = evaluate.load_benchmark(oly)[1][0]
    assert item["question"] == "c\nq" and item["gold"] == "4" and evaluate.last_boxed(item["solution"]) == "$4$"
    gaokao = write_lines(tmp_path / "gaokao.jsonl", [{"question": "q", "answer": "$\\frac{2}{3}$", "lang": "en"}])
    assert evaluate.load_benchmark(gaokao)[1][0]["gold"] == r"\frac{2}{3}"


def test_dataset_name():
    assert evaluate.dataset_name("../shared/data/gsm8k/test.jsonl") == "gsm8k"
    assert evaluate.dataset_name("data/synthetic/dev.jsonl") == "synthetic_dev"
    assert evaluate.dataset_name("hub:openai/gsm8k:main") == "gsm8k"


def test_unknown_fields(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [{"prompt": "p", "target": "t"}])
    with pytest.raises(DataError, match=r"found fields \['prompt', 'target'\].*expected one of: gsm8k"):
        evaluate.load_benchmark(path)


def test_malformed_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n{"question": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        evaluate.load_benchmark(str(path))


def test_oracle(tmp_path, capsys):
    rows = [{"question": "q1", "answer": "a\n#### 7"}, {"question": "q2", "answer": "b\n#### 1,000"}]
    _, items = evaluate.load_benchmark(write_lines(tmp_path / "ok.jsonl", rows))
    assert all(r["correct"] for r in evaluate.oracle(items, "ok"))
    rows = [{"problem": "p1", "solution": r"\boxed{3}", "answer": "3"},
            {"problem": "p2", "solution": r"wrong: \boxed{5}", "answer": "6"}]
    _, items = evaluate.load_benchmark(write_lines(tmp_path / "wrong.jsonl", rows))
    assert [r["correct"] for r in evaluate.oracle(items, "wrong")] == [True, False]
    assert "misgraded wrong id=1: gold='6' extracted='5'" in capsys.readouterr().out


def run_main(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *argv])
    evaluate.main()


@pytest.fixture
def fake_model(monkeypatch):
    """No model: load_model returns nothing and `solve` answers the gold for even ids; records who was asked."""
    calls = []

    def fake_solve(model, tokenizer, template, items, max_new_tokens, batch_size):
        calls.append([it["id"] for it in items])
        return [(f"Step 1: think.\nStep 2: \\boxed{{{it['gold'] if int(it['id']) % 2 == 0 else -1}}}", 9)
                for it in items]

    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(evaluate, "solve", fake_solve)
    return calls


def test_resume_after_kill(tmp_path, monkeypatch, fake_model):
    data = write_lines(tmp_path / "toy.jsonl", [{"id": i, "question": f"q{i}", "answer": str(i)} for i in range(10)])
    out = tmp_path / "eval"
    real_solve = evaluate.solve

    def dies_on_third_batch(*a, **k):
        if len(fake_model) == 2:
            raise KeyboardInterrupt
        return real_solve(*a, **k)

    monkeypatch.setattr(evaluate, "solve", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run_main(monkeypatch, "--model", "m", "--data", data, "--out-dir", str(out), "--batch-size", "3")
    assert len(read_jsonl(str(out / "toy.jsonl.partial"))) == 1 + 6  # the manifest, 6 records
    monkeypatch.setattr(evaluate, "solve", real_solve)
    run_main(monkeypatch, "--model", "m", "--data", data, "--out-dir", str(out), "--batch-size", "3")
    assert fake_model == [["0", "1", "2"], ["3", "4", "5"], ["6", "7", "8"], ["9"]]  # nothing asked twice
    records = read_jsonl(str(out / "toy.jsonl"))
    assert [r["id"] for r in records] == [str(i) for i in range(10)]
    assert not os.path.exists(out / "toy.jsonl.partial")
    assert [r["correct"] for r in records] == [i % 2 == 0 for i in range(10)]
    summary = json.loads((out / "toy.summary.json").read_text())
    assert summary["n"] == 10 and summary["accuracy"] == 0.5 and summary["accuracy_se"] == pytest.approx(0.5 / 10 ** .5)
    assert summary["steps_per_solution"] == 2 and summary["mean_output_tokens"] == 9
    run_main(monkeypatch, "--model", "m", "--data", data, "--out-dir", str(out))  # done: skipped
    assert len(fake_model) == 4


def test_shards_merge(tmp_path, monkeypatch, fake_model):
    data = write_lines(tmp_path / "toy.jsonl", [{"id": i, "question": f"q{i}", "answer": str(i)} for i in range(5)])
    out = tmp_path / "eval"
    run_main(monkeypatch, "--model", "m", "--data", data, "--out-dir", str(out), "--shard", "1/2")
    assert not os.path.exists(out / "toy.summary.json")  # shard 0 not done yet
    run_main(monkeypatch, "--model", "m", "--data", data, "--out-dir", str(out), "--shard", "0/2")
    assert sorted(fake_model) == [["0", "2", "4"], ["1", "3"]]
    assert [r["id"] for r in read_jsonl(str(out / "toy.jsonl"))] == ["0", "1", "2", "3", "4"]
    assert json.loads((out / "toy.summary.json").read_text())["accuracy"] == 0.6


def test_prefill_chunk_reaches_the_model_only_when_asked(tmp_path, monkeypatch, fake_model):
    data = write_lines(tmp_path / "toy.jsonl", [{"id": 0, "question": "q0", "answer": "0"}])
    for argv, chunk in [([], 0), (["--prefill-chunk", "256"], 256)]:
        asked = {}
        monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: asked.update(k) or (None, None))
        run_main(monkeypatch, "--model", "m", "--data", data, "--out-dir", str(tmp_path / str(chunk)), *argv)
        assert asked["prefill_chunk"] == chunk  # load_model sets it on the model (tests/test_search.py)


def test_judge_eval(tmp_path, monkeypatch, fake_model):
    pairs = [dict(id=i, question="q", previous_steps=["Step 1: a"], step_a="A", step_b="B", label=label, judgment="")
             for i, label in enumerate("AABB")]
    data = write_lines(tmp_path / "eft_test.jsonl", pairs)
    # verdicts: right, wrong, unparsed, right
    monkeypatch.setattr(evaluate, "judge_pairs", lambda model, tok, template, items, max_new_tokens, batch_size, **kw:
                        [("A", "[[A]]"), ("B", "[[B]]"), (None, "?"), ("B", "[[B]]")][:len(items)])
    run_main(monkeypatch, "--model", "m", "--judge-eval", data, "--out-dir", str(tmp_path / "eval"))
    summary = json.loads((tmp_path / "eval" / "judge_eval.summary.json").read_text())
    assert summary["n"] == 4 and summary["judge_accuracy"] == 0.5 and summary["unparsed"] == 1
    assert [r["verdict"] for r in read_jsonl(str(tmp_path / "eval" / "judge_eval.jsonl"))] == ["A", "B", None, "B"]


@pytest.mark.parametrize("name", ["gsm8k", "math500", "amc23", "aime24"])
def test_oracle_on_benchmarks(name):
    path = os.path.join(SHARED, name, "test.jsonl")
    if not os.path.exists(path):
        pytest.skip(f"{path} not here (benchmark data lives in ../shared/data)")
    _, items = evaluate.load_benchmark(path)
    records = evaluate.oracle(items[:200], name)
    assert sum(r["correct"] for r in records) / len(records) >= 0.99
