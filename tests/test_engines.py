"""
The engine choice as the main environment sees it (no vllm here; tests/test_vllm.py runs the vLLM engine itself in
.venv-vllm): --engine reaches generate.py, judge.py and evaluate.py and, without vllm, ends in a one-line error; the
HF reference's stopping rules on the scripted model (tests/scripted.py), which test_vllm.py holds vLLM to; and the
NF4-dequantized base that vLLM serves under --load-in-4bit, checked against bitsandbytes' own dequantization.

    python -m pytest tests/test_engines.py -q
"""

import importlib.util
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import evaluate  # noqa: E402
import generate  # noqa: E402
import judge  # noqa: E402
import modeling  # noqa: E402
import scripted  # noqa: E402
from common import DataError, write_jsonl  # noqa: E402
from scripted import EXPECTED, MAX_NEW_TOKENS, MODES  # noqa: E402


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None,
                    reason="vllm is installed here: tests/test_vllm.py runs the stages through it")
def test_engine_flag_reaches_each_stage_and_needs_vllm(tmp_path, monkeypatch):
    questions = str(tmp_path / "q.jsonl")
    write_jsonl(questions, [dict(id="1", question="Ann has 2 pens.", answer="2")])
    trees = str(tmp_path / "trees.jsonl")
    write_jsonl(trees, [dict(id="1", question="Ann has 2 pens.", steps=[])])
    stages = [(generate, ["--questions", questions, "--out", str(tmp_path / "out.jsonl")]),
              (judge, ["--trees", trees, "--out", str(tmp_path / "rejudged.jsonl")]),
              (evaluate, ["--data", questions, "--out-dir", str(tmp_path / "eval")])]
    for stage, argv in stages:
        monkeypatch.setattr(sys, "argv", [f"{stage.__name__}.py", "--model", "m", "--engine", "vllm", *argv])
        with pytest.raises(DataError, match="--engine vllm needs vLLM: pip install -r requirements-vllm.txt"):
            stage.main()


@pytest.fixture(scope="module")
def scripted_model(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("scripted"))
    scripted.build(out)
    model, tokenizer = modeling.load_model(out)
    return model.eval(), tokenizer


def test_hf_stopping_rules_on_the_scripted_model(scripted_model):
    """One prompt at a time (no padding): a step marker opening the continuation is no stop, a later one is; EOS;
    the token limit; --stop-at-verdict ends the judge's text at its first [[A]]/[[B]]."""
    model, tokenizer = scripted_model
    for k, mode in enumerate(MODES):
        for prompt, expected in EXPECTED.items():
            (out,) = modeling.generate(model, tokenizer, [prompt], MAX_NEW_TOKENS, batch_size=1, **mode)
            assert (out["text"], out["eos"], out["new_tokens"]) == expected[k], (prompt, mode)


def test_hf_stopping_rules_in_one_batch(scripted_model):
    """All scripts in one batch: a row that stops early (step marker, verdict, EOS) is padded with the pad token,
    which is the EOS here; that padding is neither an EOS the model emitted nor a generated token. Sampled with one
    seed per prompt (modeling.SeededGumbel, as the search samples) too: the scripted margins make every draw the
    scripted token."""
    model, tokenizer = scripted_model
    prompts = list(EXPECTED)
    for k, mode in enumerate(MODES):
        outs = modeling.generate(model, tokenizer, prompts, MAX_NEW_TOKENS, batch_size=len(prompts), **mode)
        assert [(o["text"], o["eos"], o["new_tokens"]) for o in outs] == [EXPECTED[p][k] for p in prompts], mode
    prompts = [p for p in EXPECTED for _ in range(3)]
    outs = modeling.generate(model, tokenizer, prompts, MAX_NEW_TOKENS, temperature=0.5, top_p=0.95, one_step=True,
                             batch_size=len(prompts), seeds=list(range(len(prompts))))
    assert [(o["text"], o["eos"], o["new_tokens"]) for o in outs] == [EXPECTED[p][0] for p in prompts]


def test_hf_judge_stops_at_the_verdict(scripted_model):
    model, tokenizer = scripted_model
    template = "{context}{step_a}{step_b}"  # the scripted model has no chat template: the prompt ends in "v"
    writes_on = modeling.judge_pairs(model, tokenizer, template, [("", "", "v")], max_new_tokens=12)
    stops = modeling.judge_pairs(model, tokenizer, template, [("", "", "v")], max_new_tokens=12, stop_at_verdict=True)
    assert writes_on == [("A", "[[A]]EEEEEEEEE")] and stops == [("A", "[[A]]")]


def test_nf4_dequantized_copy_holds_the_weights_bitsandbytes_computes_with(tiny_model_dir, tmp_path):
    """vllm_engine's base under --load-in-4bit: every linear layer that from_pretrained quantizes to NF4 holds the
    bf16 weight bitsandbytes dequantizes it to (what QLoRA trained the adapter against); the rest is unchanged."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (requirements-test.txt has it)")
    import vllm_engine
    from transformers import AutoModelForCausalLM
    out = vllm_engine.nf4_dequantized_copy(tiny_model_dir, str(tmp_path / "nf4"))
    copy = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    quantized = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, device_map={"": "cpu"},
                                                     quantization_config=modeling.bnb_4bit_config())
    linear4bit = {name: m for name, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(linear4bit) == 7 * len(copy.model.layers)  # q k v o gate up down
    copied, before = dict(copy.named_parameters()), dict(original.named_parameters())
    for name, p in copied.items():
        module = name.rsplit(".", 1)[0]
        if module in linear4bit and name.endswith(".weight"):
            w = linear4bit[module].weight
            assert torch.equal(p, bnb.functional.dequantize_4bit(w.data, w.quant_state))
            assert not torch.equal(p, before[name])  # quantization moved it
        else:
            assert torch.equal(p, before[name]), name  # embeddings, norms, lm_head as in the checkpoint
    assert vllm_engine.nf4_dequantized_copy(tiny_model_dir, out) == out  # written once, then reused
