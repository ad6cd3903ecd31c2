"""
`prepare.paper_data --source hub` without the hub: datasets.load_dataset is redirected to local copies of the same
sets (the benchmark folder, $PSRLM_DATA), served in each hub set's record shape -- its configs, splits and fields,
as its dataset card gives them -- through datasets' own JSON loader, so the field mapping (paper_data.HUB_SETS) runs
on what load_dataset really returns (Arrow types, a field only some rows have given to all as None).

Checks: every set copied from the "hub" reads back like the local file (evaluate.py's normalize for the benchmarks,
the records for the training sets), and the paper preset's data step builds byte-identical files with no local
folder (--source hub) as with SHARED=<folder> (--source <folder>).

    python -m pytest tests/test_hub_data.py -q
    PSRLM_SLOW_TESTS=1 python -m pytest tests/test_hub_data.py -q     # the data step at full size (~2 min)
"""

import filecmp
import os
import sys

import pytest

from conftest import ROOT, source_preset

sys.path.insert(0, ROOT)

import evaluate  # noqa: E402
from common import read_jsonl, write_jsonl  # noqa: E402
from prepare import paper_data  # noqa: E402

LOCAL = next((d for d in (os.environ.get("PSRLM_DATA"), os.path.join(ROOT, "data"), "/work/shared/data")
              if d and all(os.path.exists(os.path.join(d, p)) for p in paper_data.HUB_SETS)), None)
pytestmark = pytest.mark.skipif(LOCAL is None, reason="needs local copies of the benchmark sets (set PSRLM_DATA "
                                "to a folder in the layout of prepare/paper_data.py: HUB_SETS)")
BENCHMARKS = ["gsm8k/test.jsonl", "math/test.jsonl", "math500/test.jsonl", "gaokao2023en/test.jsonl",
              "olympiadbench/test.jsonl", "aime24/test.jsonl", "amc23/test.jsonl"]
MATH_TYPES = {"Algebra": "algebra", "Counting & Probability": "counting_and_probability", "Geometry": "geometry",
              "Intermediate Algebra": "intermediate_algebra", "Number Theory": "number_theory",
              "Prealgebra": "prealgebra", "Precalculus": "precalculus"}


def hub_records(name, config, split, data_files):
    """What the hub serves for one load_dataset call, made from the local copies; anything else is an error."""
    def rows(path):
        return read_jsonl(os.path.join(LOCAL, path))

    if name == "openai/gsm8k" and config == "main" and split in ("train", "test"):
        return rows(f"gsm8k/{split}.jsonl")
    if name == "EleutherAI/hendrycks_math" and config in MATH_TYPES.values() and split in ("train", "test"):
        return [dict(problem=r["problem"], level=r["level"], type=r["type"], solution=r["solution"])
                for r in rows(f"math/{split}.jsonl") if MATH_TYPES[r["type"]] == config]  # no unique_id on the hub
    if (name, config, split) == ("HuggingFaceH4/MATH-500", None, "test"):
        return rows("math500/test.jsonl")
    if (name, config, split) == ("MARIO-Math-Reasoning/Gaokao2023-Math-En", None, "train"):
        return rows("gaokao2023en/test.jsonl")
    if (name, config, split) == ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train"):
        return [dict(r, **{f"image_{k}": None for k in range(1, 6)}, modality="Text-only", language="English")
                for r in rows("olympiadbench/test.jsonl")]
    if (name, config, split) == ("HuggingFaceH4/aime_2024", None, "train"):
        return [dict({k: v for k, v in r.items() if k != "question"}, year="2024") for r in rows("aime24/test.jsonl")]
    if (name, config, split) == ("AI-MO/aimo-validation-amc", None, "train"):  # AMC 12 of 2022 and 2023
        amc23 = [{k: v for k, v in r.items() if k != "question"} for r in rows("amc23/test.jsonl")]
        other = dict(amc23[0], id=1000, url="https://artofproblemsolving.com/wiki/index.php/2022_AMC_12A_Problems/"
                     "Problem_1", problem="A 2022 problem.")
        return [other] + amc23
    if (name, config, split) == ("Birchlabs/openai-prm800k-stepwise-critic", None, "test") and \
            data_files == {"test": "data/phase1_test.stepwise-critic.parquet"}:
        return rows("prm800k/phase1_test_stepwise_critique.jsonl")
    raise AssertionError(f"unexpected hub request: {name} {config} {split} {data_files}")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """datasets.load_dataset redirected: each call serves hub_records through load_dataset('json', ...)."""
    import datasets
    real_load_dataset, served = datasets.load_dataset, []

    def load_dataset(name, config=None, split=None, data_files=None, **kwargs):
        path = str(tmp_path / "served" / f"{len(served)}.jsonl")
        write_jsonl(path, hub_records(name, config, split, data_files))
        served.append((name, config, split))
        return real_load_dataset("json", data_files=path, split="train", cache_dir=str(tmp_path / "cache"))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return served


def test_hub_copies_read_like_the_local_files(hub, tmp_path):
    paper_data.fetch_hub(str(tmp_path / "hub"))
    assert len(hub) == len(paper_data.HUB_SETS) + 2 * (len(MATH_TYPES) - 1)  # MATH: one config per subject
    for path in BENCHMARKS:
        copy = evaluate.load_benchmark(str(tmp_path / "hub" / path))[1]
        local = evaluate.load_benchmark(os.path.join(LOCAL, path))[1]
        key = lambda it: (it["question"], it["gold"], it["solution"])  # noqa: E731 (ids: MATH's are the hub's order)
        assert sorted(map(key, copy)) == sorted(map(key, local)), path
    assert len(read_jsonl(str(tmp_path / "hub" / "amc23" / "test.jsonl"))) == 40  # the 2022 problem left out
    for path, fields in [("gsm8k/train.jsonl", ("question", "answer")), ("math/train.jsonl", ("problem", "solution"))]:
        copy = sorted(tuple(r[f] for f in fields) for r in read_jsonl(str(tmp_path / "hub" / path)))
        assert copy == sorted(tuple(r[f] for f in fields) for r in read_jsonl(os.path.join(LOCAL, path))), path
    prm = "prm800k/phase1_test_stepwise_critique.jsonl"
    assert read_jsonl(str(tmp_path / "hub" / prm)) == read_jsonl(os.path.join(LOCAL, prm))  # nulls kept


def test_the_preset_data_step_builds_the_same_files_from_the_hub(hub, tmp_path, monkeypatch):
    """The data step as presets/paper.sh sets it up (DATA_SOURCE, DATA_ARGS), once with no local folder and once
    with SHARED=<the copies>; every file it builds is byte-identical (not the configs, which name their inputs)."""
    outputs = {}
    for shared in ("", LOCAL):
        preset = dict(line.split("=", 1) for line in source_preset(
            tmp_path, 1, env=dict(SHARED=shared), show=("DATA_SOURCE", "DATA_ARGS")).stdout.splitlines())
        out = str(tmp_path / ("from_hub" if not shared else "from_local"))
        limit = [] if os.environ.get("PSRLM_SLOW_TESTS") else ["--limit", "300"]  # IFT/EFT inputs: the first 300
        argv = ["paper_data.py", "--source", preset["DATA_SOURCE"], "--out-dir", out, *preset["DATA_ARGS"].split()]
        monkeypatch.setattr(sys, "argv", argv + limit)
        paper_data.main()
        outputs[shared] = out
    assert os.path.isdir(os.path.join(outputs[""], "hub")) and not os.path.exists(os.path.join(outputs[LOCAL], "hub"))
    built = sorted(f for f in os.listdir(outputs[LOCAL]) if f.endswith(".jsonl"))
    assert built == ["eft.jsonl", "eft_all.jsonl", "eft_test.jsonl", "gsm8k_train_ift.jsonl", "ift.jsonl",
                     "math_train_ift.jsonl", "questions1.jsonl", "questions2.jsonl", "questions3.jsonl"]
    match, mismatch, errors = filecmp.cmpfiles(outputs[""], outputs[LOCAL], built, shallow=False)
    assert match == built, (mismatch, errors)
    assert [len(read_jsonl(os.path.join(outputs[""], f"questions{t}.jsonl"))) for t in (1, 2, 3)] == [400, 800, 1200]
