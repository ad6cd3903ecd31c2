"""
(Q)LoRA training (common.prepare_for_training / save_model / load_model, train_step_dpo.py): with gradient
checkpointing the adapter really trains (every lora_A/lora_B changes, every base weight stays bit-identical), the
first Step-DPO loss is exactly log 2 (LoRA starts as the identity: B = 0, dropout 0), an adapter directory reloads
to the same logits, and iteration t+1 continues iteration t's adapter with M_t (not the bare base) as reference.

    python -m pytest tests/test_lora.py -q
"""

import importlib.util
import json
import math
import os
import sys
import types

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from prepare import tiny_model  # noqa: E402
import train_step_dpo  # noqa: E402
from conftest import eft_step_pairs  # noqa: E402
from common import DataError, read_jsonl, write_jsonl  # noqa: E402
from modeling import load_model, make_optimizer, prepare_for_training, save_model  # noqa: E402

LORA_ARGS = types.SimpleNamespace(lora=True, lora_rank=4, lora_alpha=8, lora_layers=0, lora_dropout=0.0,
                                  load_in_4bit=False, gradient_checkpointing=True, optim="adamw")



def pair_batch(tokenizer, pairs):
    """(prefixes, steps) as train_step_dpo batches them: the chosen steps first, then the rejected ones."""
    tokenized = [train_step_dpo.tokenize_pair(tokenizer, p, final_step_eos=True) for p in pairs]
    return [t[0] for t in tokenized] * 2, [t[1] for t in tokenized] + [t[2] for t in tokenized]


def dpo_step(model, optimizer, tokenizer, batch, ref_logps, beta=0.1):
    """One optimizer step of the Step-DPO loss (Eqs. 6-8) on one batch; returns the mean loss."""
    n = len(ref_logps) // 2
    logps = train_step_dpo.step_logps(model, *batch, tokenizer.pad_token_id)
    losses, _, _ = train_step_dpo.step_dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta)
    losses.mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return losses.mean().item()


def split_weights(model):
    """{name: copy} of the adapter weights and of the base weights."""
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    return lora, base


def test_gradient_checkpointing_trains_the_adapter_and_nothing_else(tiny_model_dir, synthetic_dir):
    model, tokenizer = load_model(tiny_model_dir, trainable=True)
    batch = pair_batch(tokenizer, eft_step_pairs(synthetic_dir, 4))
    with torch.no_grad():
        ref_logps = train_step_dpo.step_logps(model.eval(), *batch, tokenizer.pad_token_id)  # π_ref = M_t
    model = prepare_for_training(model, LORA_ARGS)
    lora_before, base_before = split_weights(model)
    assert lora_before and all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert all(float(w.abs().max()) == 0 for n, w in lora_before.items() if "lora_B" in n)  # LoRA starts as identity

    # checkpointing is really on: the inside of a decoder layer starts twice (once more, recomputed, in backward)
    calls = []
    hook = model.get_base_model().model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    optimizer = make_optimizer(model, LORA_ARGS, lr=1e-2)
    first_loss = dpo_step(model, optimizer, tokenizer, batch, ref_logps)
    hook.remove()
    assert len(calls) == 2
    assert first_loss == pytest.approx(math.log(2), abs=1e-7)  # policy == reference exactly at step 0
    losses = [dpo_step(model, optimizer, tokenizer, batch, ref_logps) for _ in range(2)]

    lora_after, base_after = split_weights(model)
    unchanged = [n for n in lora_before if torch.equal(lora_before[n], lora_after[n])]
    assert not unchanged, f"adapter weights that did not train: {unchanged}"
    assert all(torch.equal(base_before[n], base_after[n]) for n in base_before)
    assert losses[-1] < first_loss


def test_lora_on_the_last_layers_only_stops_the_backward_pass_there(tiny_model_dir, synthetic_dir):
    """--lora-layers 1 on the 2-layer model: adapters in layer 1 only, they train, and no gradient reaches layer 0."""
    model, tokenizer = load_model(tiny_model_dir, trainable=True)
    batch = pair_batch(tokenizer, eft_step_pairs(synthetic_dir, 4))
    with torch.no_grad():
        ref_logps = train_step_dpo.step_logps(model.eval(), *batch, tokenizer.pad_token_id)
    model = prepare_for_training(model, types.SimpleNamespace(**{**vars(LORA_ARGS), "lora_layers": 1,
                                                                 "gradient_checkpointing": False}))
    adapted = {n.split(".layers.")[1].split(".")[0] for n, _ in model.named_parameters() if "lora_" in n}
    assert adapted == {"1"}
    assert {n.split(".lora_A")[0].split(".")[-1] for n, _ in model.named_parameters() if "lora_A" in n} == \
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # every linear of the layer
    reached = []
    layers = model.get_base_model().model.layers
    hooks = [layer.register_full_backward_hook(lambda m, gi, go, k=k: reached.append(k)) for k, layer in
             enumerate(layers)]
    lora_before, _ = split_weights(model)
    optimizer = make_optimizer(model, LORA_ARGS, lr=1e-2)
    for _ in range(2):  # lora_A gets a gradient once lora_B is no longer 0
        dpo_step(model, optimizer, tokenizer, batch, ref_logps)
    for hook in hooks:
        hook.remove()
    assert reached and set(reached) == {1}
    lora_after, _ = split_weights(model)
    assert all(not torch.equal(lora_before[n], lora_after[n]) for n in lora_before)


def test_adapter_round_trip_and_next_iteration(tiny_model_dir, synthetic_dir, tmp_path, monkeypatch):
    """M_t saved as an adapter reloads to the same logits; train_step_dpo.py from it continues that adapter."""
    model, tokenizer = load_model(tiny_model_dir, trainable=True)
    batch = pair_batch(tokenizer, eft_step_pairs(synthetic_dir, 4))
    with torch.no_grad():
        base_logps = train_step_dpo.step_logps(model.eval(), *batch, tokenizer.pad_token_id)
    model = prepare_for_training(model, LORA_ARGS)
    optimizer = make_optimizer(model, LORA_ARGS, lr=1e-2)
    for _ in range(3):
        dpo_step(model, optimizer, tokenizer, batch, base_logps)
    m2 = str(tmp_path / "m2")
    save_model(model, tokenizer, m2)
    files = set(os.listdir(m2))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files  # only the adapter, not a copy of the base
    assert json.load(open(os.path.join(m2, "adapter_config.json")))["base_model_name_or_path"] == tiny_model_dir

    reloaded, _ = load_model(m2)
    with torch.no_grad():
        logps_in_memory = train_step_dpo.step_logps(model.eval(), *batch, tokenizer.pad_token_id)
        logps_reloaded = train_step_dpo.step_logps(reloaded.eval(), *batch, tokenizer.pad_token_id)
    assert torch.allclose(logps_reloaded, logps_in_memory, atol=1e-5)
    assert not torch.allclose(logps_reloaded, base_logps, atol=1e-3)  # M2 is not M1
    saved_lora, _ = split_weights(reloaded)

    # iteration t+1 exactly as iterate.sh runs it; the reference is M2 (adapter on), so the first loss is log 2
    pairs = str(tmp_path / "pairs.jsonl")
    write_jsonl(pairs, eft_step_pairs(synthetic_dir, 4))
    m3 = str(tmp_path / "m3")
    monkeypatch.setattr(sys, "argv", ["train_step_dpo.py", "--model", m2, "--pairs", pairs, "--out", m3,
                                      "--lora", "--lora-rank", "4", "--lora-alpha", "8", "--gradient-checkpointing",
                                      "--lr", "1e-2", "--batch-size", "2", "--grad-accum", "1"])
    train_step_dpo.main()
    ref = {r["id"]: r for r in read_jsonl(m3 + ".ref_logps.jsonl")}
    ids = [p["id"] for p in eft_step_pairs(synthetic_dir, 4)]
    ref_m2 = torch.tensor([ref[i]["ref_chosen"] for i in ids] + [ref[i]["ref_rejected"] for i in ids])
    assert torch.allclose(ref_m2, logps_reloaded, atol=1e-4) and not torch.allclose(ref_m2, base_logps, atol=1e-3)
    log = read_jsonl(os.path.join(m3, "train_log.jsonl"))
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)

    config = json.load(open(os.path.join(m3, "adapter_config.json")))
    assert config["base_model_name_or_path"] == tiny_model_dir  # one adapter on M0, not an adapter on an adapter
    m3_model, _ = load_model(m3)
    m3_lora, _ = split_weights(m3_model)
    assert saved_lora.keys() == m3_lora.keys()
    assert all(not torch.equal(saved_lora[n], m3_lora[n]) for n in saved_lora if "lora_B" in n)  # it trained on


def test_adapter_on_a_different_base_is_a_data_error(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(tiny_model_dir, trainable=True)
    adapter = str(tmp_path / "adapter")
    save_model(prepare_for_training(model, LORA_ARGS), tokenizer, adapter)
    other = str(tmp_path / "other_base")  # same tokenizer, hidden size 48 instead of 32
    tiny_model.build_model(tokenizer, hidden=48, layers=2, heads=2, max_len=512, seed=0).save_pretrained(other)
    tokenizer.save_pretrained(other)
    config_path = os.path.join(adapter, "adapter_config.json")
    config = json.load(open(config_path))
    config["base_model_name_or_path"] = other
    json.dump(config, open(config_path, "w"))
    with pytest.raises(DataError) as error:
        load_model(adapter)
    assert adapter in str(error.value) and other in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on a machine without CUDA")
def test_4bit_without_cuda_is_a_data_error(tiny_model_dir):
    with pytest.raises(DataError, match="--load-in-4bit needs a CUDA GPU"):
        load_model(tiny_model_dir, load_in_4bit=True)


@pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes")),
                    reason="4-bit QLoRA needs CUDA + bitsandbytes")
def test_qlora_trains_the_adapter_on_a_4bit_base(tiny_model_dir, synthetic_dir):
    import bitsandbytes
    model, tokenizer = load_model(tiny_model_dir, load_in_4bit=True, trainable=True)
    assert any(isinstance(m, bitsandbytes.nn.Linear4bit) for m in model.modules())
    batch = pair_batch(tokenizer, eft_step_pairs(synthetic_dir, 4))
    with torch.no_grad():
        ref_logps = train_step_dpo.step_logps(model.eval(), *batch, tokenizer.pad_token_id)
    model = prepare_for_training(model, types.SimpleNamespace(**{**vars(LORA_ARGS), "load_in_4bit": True}))
    lora_before, _ = split_weights(model)
    optimizer = make_optimizer(model, LORA_ARGS, lr=1e-2)
    assert dpo_step(model, optimizer, tokenizer, batch, ref_logps) == pytest.approx(math.log(2), abs=1e-3)
    dpo_step(model, optimizer, tokenizer, batch, ref_logps)
    lora_after, _ = split_weights(model)
    assert all(not torch.equal(lora_before[n], lora_after[n]) for n in lora_before)
