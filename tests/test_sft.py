"""
train_sft.py and the tiny model M0: the loss is the mean NLL of the response tokens only (checked against a hand
computation and through its gradient), the tiny model and tokenizer round-trip through save/load, the step boundary
is token-additive, and a short in-process SFT run lowers the loss and is skipped when rerun.

    python -m pytest tests/test_sft.py -q
"""

import json
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from prepare import tiny_model  # noqa: E402
from conftest import ends_within, ids_of  # noqa: E402
import train_sft  # noqa: E402
from common import chat_prompt, join_steps, load_prompt, read_jsonl  # noqa: E402
from modeling import load_model, padded_batch, save_model  # noqa: E402


def sft_batch(tokenizer, synthetic_dir):
    """Two IFT examples of different lengths, right-padded as train_sft pads them."""
    records = read_jsonl(os.path.join(synthetic_dir, "ift.jsonl"))[:2]
    template = load_prompt("reasoning_tiny")
    examples = [train_sft.sft_example(tokenizer, template.format(problem=r["question"]), r["solution"], 512)
                for r in records]
    assert len(examples[0][0]) != len(examples[1][0])
    ids, att, pos, mask = padded_batch([e[0] for e in examples], tokenizer.pad_token_id, [e[1] for e in examples])
    return records, examples, ids, att, pos, mask


# ----------------------------------------------------------------------------------------------------------------
# the example and the loss


def test_sft_example_layout(tiny):
    _, tokenizer = tiny
    prompt_ids = ids_of(tokenizer, chat_prompt(tokenizer, "Solve: 2 + 3"))
    response_ids = ids_of(tokenizer, "Step 1: 2 + 3 = 5.")
    ids, mask = train_sft.sft_example(tokenizer, "Solve: 2 + 3", "Step 1: 2 + 3 = 5.", 512)
    assert ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert mask == [0] * len(prompt_ids) + [1] * (len(response_ids) + 1)  # the EOS is learned too
    short_ids, short_mask = train_sft.sft_example(tokenizer, "Solve: 2 + 3", "Step 1: 2 + 3 = 5.", len(prompt_ids) + 2)
    assert short_ids == ids[:len(prompt_ids) + 2] and sum(short_mask) == 2


def test_loss_is_mean_nll_of_response_tokens(tiny, synthetic_dir):
    model, tokenizer = tiny
    _, examples, ids, att, pos, mask = sft_batch(tokenizer, synthetic_dir)
    logits = model(input_ids=ids, attention_mask=att, position_ids=pos).logits.detach()
    loss = train_sft.masked_nll(logits, ids, mask)
    # by hand: -log p(token_t | tokens_<t) for every response token t of every example, averaged
    terms = []
    for b, (seq, m) in enumerate(examples):
        logp = logits[b].double().log_softmax(-1)
        terms += [-logp[t - 1, seq[t]].item() for t in range(1, len(seq)) if m[t]]
    assert len(terms) == int(mask.sum()) and len(terms) < 0.7 * int(att.sum())  # the prompt is most tokens
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-5)
    assert 4.0 < loss.item() < 7.5  # ~ log(vocab) for random weights

    # the labels inside the prompt (and the padding) do not matter; a response label does
    changed = ids.clone()
    prompt_or_pad = mask == 0
    changed[prompt_or_pad] = (changed[prompt_or_pad] + 7) % len(tokenizer)
    assert train_sft.masked_nll(logits, changed, mask).item() == loss.item()
    changed = ids.clone()
    t = int(mask[0].nonzero()[3])
    changed[0, t] = (changed[0, t] + 7) % len(tokenizer)
    assert abs(train_sft.masked_nll(logits, changed, mask).item() - loss.item()) > 1e-4


def test_logits_predicting_prompt_tokens_get_zero_gradient(tiny, synthetic_dir):
    model, tokenizer = tiny
    _, _, ids, att, pos, mask = sft_batch(tokenizer, synthetic_dir)
    logits = model(input_ids=ids, attention_mask=att, position_ids=pos).logits
    logits.retain_grad()
    train_sft.masked_nll(logits, ids, mask).backward()
    grad = logits.grad.abs().sum(-1)  # [B, T]: the gradient reaching the logits at position t (they predict t+1)
    predicts_response = torch.zeros_like(mask, dtype=torch.bool)
    predicts_response[:, :-1] = mask[:, 1:].bool()
    assert torch.all(grad[~predicts_response] == 0)  # exactly zero: prompt, padding, and the last position
    assert torch.all(grad[predicts_response] > 1e-6)
    assert int(predicts_response.sum()) == int(mask.sum())
    # the prompt's input embeddings still get gradient, through attention from the response: context, not target
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    train_sft.masked_nll(model(inputs_embeds=embeds, attention_mask=att, position_ids=pos).logits, ids, mask).backward()
    assert torch.all(embeds.grad[0, :5].abs().sum(-1) > 0)
    model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------------------
# the tiny model and its tokenizer


def test_tiny_model_round_trips_through_save_and_load(tiny, tmp_path):
    model, tokenizer = tiny
    ids = torch.tensor([ids_of(tokenizer, chat_prompt(tokenizer, "Tom has 3 pens.") + "Step 1: 3 + 4 = 7.")])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    save_model(model, tokenizer, str(tmp_path / "copy"))
    assert not os.path.exists(str(tmp_path / "copy.tmp"))
    loaded, loaded_tok = load_model(str(tmp_path / "copy"))
    with torch.no_grad():
        after = loaded.eval()(input_ids=ids).logits
    assert torch.equal(before, after)
    assert loaded_tok.chat_template == tiny_model.CHAT_TEMPLATE
    assert chat_prompt(loaded_tok, "hi") == "<|user|>\nhi\n<|assistant|>\n"
    assert loaded_tok.eos_token == "<|endoftext|>" and loaded_tok.pad_token == "<|pad|>"
    assert loaded_tok.pad_token_id != loaded_tok.eos_token_id
    assert loaded.generation_config.eos_token_id == loaded_tok.eos_token_id
    assert ids_of(loaded_tok, "Step 12: 7 * 3 = 21.") == ids_of(tokenizer, "Step 12: 7 * 3 = 21.")


def test_step_boundary_is_token_additive(tiny, synthetic_dir):
    _, tokenizer = tiny
    template = load_prompt("reasoning_tiny")
    checked = 0
    for r in read_jsonl(os.path.join(synthetic_dir, "ift.jsonl"))[:20]:
        steps = r["solution"].split("\n")
        for k in range(len(steps)):
            prefix = chat_prompt(tokenizer, template.format(problem=r["question"])) + join_steps(steps[:k])
            for step in (steps[k], steps[k] + "\n"):
                assert ids_of(tokenizer, prefix) + ids_of(tokenizer, step) == ids_of(tokenizer, prefix + step)
                checked += 1
    assert checked > 100
    # digits are single tokens (arithmetic is learned digit-wise)
    assert len(ids_of(tokenizer, "1234")) == 4


@pytest.mark.parametrize("digit_space", ["own", "joined"])
def test_both_digit_spaces_keep_digits_single_and_step_boundaries_additive(synthetic_dir, digit_space):
    """--digit-space joined rides the space on a number's first digit (" 1", "6"); own gives it a token of its own.
    Either way a digit is one token, text decodes back exactly, and a step added to a prefix tokenizes as alone."""
    texts = list(tiny_model.corpus_texts([os.path.join(synthetic_dir, f) for f in ("ift.jsonl", "eft.jsonl")]))
    tokenizer = tiny_model.build_tokenizer(texts, vocab_size=300, digit_space=digit_space)
    pieces = tokenizer.tokenize("Step 2: 15 + 1 = 16.")
    fifteen = pieces[pieces.index("Ġ+") - 2:pieces.index("Ġ+")]
    assert fifteen == (["Ġ1", "5"] if digit_space == "joined" else ["1", "5"])
    assert len(ids_of(tokenizer, "1234")) == 4 and len(ids_of(tokenizer, " 1234")) == 4 + (digit_space == "own")
    ift = read_jsonl(os.path.join(synthetic_dir, "ift.jsonl"))[:20]
    template = load_prompt("reasoning_tiny")
    for r in ift:
        steps = r["solution"].split("\n")
        assert tokenizer.decode(ids_of(tokenizer, r["solution"])) == r["solution"]
        for k in range(len(steps)):
            prefix = chat_prompt(tokenizer, template.format(problem=r["question"])) + join_steps(steps[:k])
            assert ids_of(tokenizer, prefix) + ids_of(tokenizer, steps[k]) == ids_of(tokenizer, prefix + steps[k])
    if digit_space == "joined":  # what the flag is for: fewer tokens for the same text
        own = tiny_model.build_tokenizer(texts, vocab_size=300, digit_space="own")
        count = lambda tok: sum(len(ids_of(tok, r["solution"])) for r in ift)
        assert count(tokenizer) < 0.9 * count(own)


# ----------------------------------------------------------------------------------------------------------------
# the script, in process


def test_short_sft_run_lowers_the_loss_and_is_skipped_when_rerun(tiny_model_dir, synthetic_dir, tmp_path,
                                                                   monkeypatch, capsys):
    out = str(tmp_path / "m1")
    argv = ["train_sft.py", "--model", tiny_model_dir, "--ift", os.path.join(synthetic_dir, "ift.jsonl"),
            "--eft", os.path.join(synthetic_dir, "eft.jsonl"), "--out", out, "--prompt-reasoning", "reasoning_tiny",
            "--prompt-judge", "judge_tiny", "--limit", "40", "--limit-eft", "32", "--epochs", "1", "--lr", "3e-3",
            "--batch-size", "8", "--max-len", "512"]
    monkeypatch.setattr(sys, "argv", argv)
    train_sft.main()
    assert "40 IFT + 32 EFT records, 0 dropped (prompt alone >= --max-len 512), 9 optimizer steps" in \
        capsys.readouterr().out
    log = read_jsonl(os.path.join(out, "train_log.jsonl"), ["step", "loss", "lr"])
    assert [r["step"] for r in log] == list(range(1, 10))
    assert log[0]["loss"] > 4.0
    assert log[-1]["loss"] < log[0]["loss"] - 0.5
    assert max(r["lr"] for r in log) == pytest.approx(3e-3)
    config = json.load(open(os.path.join(out, "sft_config.json")))
    assert config["lr"] == 3e-3 and config["limit"] == 40
    # the trained model loads on its own and differs from M0
    trained, _ = load_model(out)
    m0, _ = load_model(tiny_model_dir)
    assert not torch.equal(trained.lm_head.weight, m0.lm_head.weight)

    weights = os.path.join(out, "model.safetensors")
    mtime = os.path.getmtime(weights)
    train_sft.main()
    assert "skipping" in capsys.readouterr().out
    assert os.path.getmtime(weights) == mtime
    assert len(read_jsonl(os.path.join(out, "train_log.jsonl"))) == 9


def test_no_examples_left_ends_instead_of_looping_forever(tiny_model_dir, synthetic_dir, tmp_path, monkeypatch):
    """--max-len shorter than every prompt leaves no example (each is truncated to its prompt); the stage must end."""
    monkeypatch.setattr(sys, "argv", ["train_sft.py", "--model", tiny_model_dir, "--ift",
                                      os.path.join(synthetic_dir, "ift.jsonl"), "--out", str(tmp_path / "m1"),
                                      "--prompt-reasoning", "reasoning_tiny", "--limit", "4", "--max-len", "8"])

    ends_within(10, train_sft.main, "train_sft.main() with no example to train on")
