"""gpu_check.py: its whole path on CPU with --tiny (in-process, seconds), and the real 4-bit path where CUDA is."""

import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts import gpu_check  # noqa: E402


def numbers(row, keys):
    return all(isinstance(row[k], (int, float)) and not isinstance(row[k], bool) and math.isfinite(row[k])
               for k in keys)


def check_result(result, out, sizes, seq_lens):
    assert json.load(open(out)) == json.loads(json.dumps(result))  # the file is the returned result
    for key in ["date", "gpu", "versions", "args", "total_seconds", "checks_passed"]:
        assert key in result
    assert set(result["versions"]) >= {"torch", "transformers", "peft", "bitsandbytes"}
    assert list(result["models"]) == sizes
    for r in result["models"].values():
        assert numbers(r, ["build_seconds", "parameters"])
        assert [row["seq_len"] for row in r["step_dpo"]] == seq_lens
        for row in r["step_dpo"]:
            assert numbers(row, ["seconds_per_step", "ref_pass_seconds", "peak_allocated_gib", "peak_reserved_gib",
                                 "static_allocated_gib", "loss_first"])
            assert row["seconds_per_step"] > 0
        # candidates and judge, before and after LoRA, then the judge with chunked prefill
        chunk = result["args"]["prefill_chunk"]
        assert [(row["name"], row["prefill_chunk"]) for row in r["generation"]] == \
            [("step candidates", None), ("judge", None)] * 2 + [(gpu_check.CHUNKED_JUDGE, chunk)]
        for row in r["generation"]:
            assert numbers(row, ["seconds", "tokens_per_s", "peak_allocated_gib", "peak_reserved_gib"])
            assert row["tokens_per_s"] > 0
        assert r["checks"] == dict(lora_changed=True, base_unchanged=True, adapter_trains=True,
                                   loss_starts_at_log2=True)
        assert set(r["fits"]) == set(gpu_check.BUDGETS_GIB)
        assert [e["questions"] for e in r["iteration_estimate"]] == [400, 800, 1200]
        assert all(e["hours"] > 0 for e in r["iteration_estimate"])
    assert result["checks_passed"] is True


def test_tiny_runs_every_path_on_cpu(tmp_path):
    out = str(tmp_path / "gpu_check.json")
    result = gpu_check.main(["--tiny", "--out", out])
    check_result(result, out, ["7b", "1.5b"], [32, 64])
    # tiny shrinks the real configurations but keeps their tying: 7B unties lm_head, 1.5B ties it
    assert result["models"]["7b"]["config"]["tie_word_embeddings"] is False
    assert result["models"]["1.5b"]["config"]["tie_word_embeddings"] is True
    assert result["models"]["7b"]["fits"]["24GB"]["step_dpo"]["seq_len"] == 64


def test_fits_takes_the_longest_measured_length_and_estimates_pairs():
    rows = [dict(seq_len=512, pairs=1, peak_reserved_gib=10.0, static_allocated_gib=6.0),
            dict(seq_len=2048, pairs=1, peak_reserved_gib=30.0, static_allocated_gib=6.0)]
    table = gpu_check.fits(rows, [dict(name="judge", weights="bf16", batch=96, peak_reserved_gib=25.0)])
    assert table["24GB"]["step_dpo"] == dict(seq_len=512, pairs_measured=1, peak_reserved_gib=10.0,
                                             pairs_estimated=4)  # (22 - 6) // (10 - 6)
    assert table["40GB"]["step_dpo"]["seq_len"] == 2048 and table["24GB"]["generation"] == []
    assert table["80GB"]["generation"] == ["judge bf16 batch 96"]


def test_nf4_lora_path_on_cpu_where_bitsandbytes_is_installed():
    """The 4-bit path minus CUDA: recent bitsandbytes quantizes and runs Linear4bit on CPU too."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (requirements-gpu.txt)")
    args = gpu_check.parse_args(["--tiny", "--sizes", "7b", "--seq-lens", "32"])
    device, vocab = torch.device("cpu"), gpu_check.TINY["vocab_size"]
    model = gpu_check.quantize_nf4_in_place(gpu_check.build_model("7b", True, device, torch.bfloat16))
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.uint8 and type(model.lm_head) is torch.nn.Linear
    model, train_args = gpu_check.prepare_lora(model, args, load_in_4bit=True)
    assert type(model.base_model.model.model.layers[0].mlp.down_proj).__module__ == "peft.tuners.lora.bnb"
    optimizer = gpu_check.modeling.make_optimizer(model, train_args, lr=1e-3)
    before = gpu_check.snapshot(model)
    rows = [gpu_check.measure_step_dpo(model, optimizer, 32, args, vocab, device)]
    assert gpu_check.adapter_checks(model, before, rows) == dict(lora_changed=True, base_unchanged=True,
                                                                 adapter_trains=True, loss_starts_at_log2=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="4-bit QLoRA needs CUDA + bitsandbytes")
def test_4bit_qlora_on_gpu(tmp_path):
    pytest.importorskip("bitsandbytes", reason="4-bit QLoRA needs CUDA + bitsandbytes")
    out = str(tmp_path / "gpu_check.json")
    result = gpu_check.main(["--sizes", "1.5b", "--seq-lens", "256", "--steps", "1", "--questions", "2",
                             "--judge-batch", "8", "--new-tokens", "8", "--out", out])
    check_result(result, out, ["1.5b"], [256])
    assert [row["weights"] for row in result["models"]["1.5b"]["generation"]][-1] == "nf4+lora"


def test_search_tokens_and_iteration_hours_by_hand():
    # 2 questions x 3 rounds: 6 candidates of 10 tokens, C(6,2)=15 comparisons x 2 orders x 100 tokens per round
    assert gpu_check.search_tokens(2, 3, 10, 6, 100, 2) == (360, 18000)
    args = gpu_check.parse_args(["--tiny", "--judge-tokens", "100"])
    gen = [dict(name="step candidates", weights="float32", tokens_per_s=1.0),  # before LoRA: not the search's model
           dict(name="step candidates", weights="float32+lora", tokens_per_s=100.0),
           dict(name="judge", weights="float32+lora", tokens_per_s=1000.0)]
    dpo = [dict(seq_len=32, pairs=1, seconds_per_step=9.0), dict(seq_len=64, pairs=2, seconds_per_step=4.0)]
    est = gpu_check.iteration_hours(gen, dpo, args, 400)
    cand, judge = 400 * 9.35 * 6 * 61.6, 400 * 9.35 * 15 * 2 * 100
    assert math.isclose(est["search_hours"], (cand / 100 + judge / 1000) / 3600)
    assert est["step_dpo_seq_len"] == 64 and math.isclose(est["step_dpo_hours"], 400 * 9.35 / 2 * 4.0 / 3600)
    assert math.isclose(est["hours"], est["search_hours"] + est["step_dpo_hours"])
    assert gpu_check.iteration_hours(gen[:1], dpo, args, 400) is None  # no measured speed of the LoRA model
    chunked = dict(name=gpu_check.CHUNKED_JUDGE, weights="float32+lora", tokens_per_s=500.0)  # the preset's setting
    est = gpu_check.iteration_hours(gen + [chunked], dpo, args, 400)
    assert math.isclose(est["search_hours"], (cand / 100 + judge / 500) / 3600)
