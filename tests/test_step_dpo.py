"""
train_step_dpo.py: the loss (Eqs. 6-8) against hand-computed values, the summed step log-probs of a left-padded
batch with logits_to_keep against an unpadded forward per example, zero gradient for the prefix, the step
tokenization (EOS only after a final step), and a short in-process run: loss log 2 at step 0, margins grow.

    python -m pytest tests/test_step_dpo.py -q
"""

import json
import math
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import make_pairs  # noqa: E402
import train_step_dpo as dpo  # noqa: E402
from conftest import eft_step_pairs, ends_within, ids_of  # noqa: E402
from common import chat_prompt, read_jsonl  # noqa: E402
from modeling import load_model  # noqa: E402

LOG2 = math.log(2)


# ----------------------------------------------------------------------------------------------------------------
# the loss, by hand


def test_loss_is_log2_when_policy_equals_reference():
    logps = torch.tensor([-3.0, -12.5, -0.1])
    losses, chosen, rejected = dpo.step_dpo_loss(logps, logps - 4.0, logps, logps - 4.0, beta=0.3)
    assert torch.allclose(losses, torch.full((3,), LOG2))
    assert torch.all(chosen == 0) and torch.all(rejected == 0)


def test_loss_matches_hand_computation():
    # beta 0.1; chosen: policy -5 vs ref -6 (A = 0.1); rejected: policy -7 vs ref -6 (B = -0.1)
    policy_chosen = torch.tensor([-5.0, -6.0], requires_grad=True)
    losses, chosen, rejected = dpo.step_dpo_loss(policy_chosen, torch.tensor([-7.0, -5.0]),
                                                 torch.tensor([-6.0, -6.0]), torch.tensor([-6.0, -6.0]), beta=0.1)
    assert losses[0].item() == pytest.approx(math.log(1 + math.exp(-0.2)), abs=1e-6)  # -log sigmoid(0.2) = 0.5981
    assert losses[0].item() == pytest.approx(0.598139, abs=1e-6)
    assert losses[1].item() == pytest.approx(math.log(1 + math.exp(0.1)), abs=1e-6)  # A = 0, B = 0.1
    assert chosen.tolist() == pytest.approx([0.1, 0.0]) and rejected.tolist() == pytest.approx([-0.1, 0.1])
    assert not chosen.requires_grad and not rejected.requires_grad  # rewards are for logging
    losses.sum().backward()
    # d/dx -log sigmoid(beta x - c) = -beta * sigmoid(-(beta x - c))
    expected = [-0.1 * (1 - 1 / (1 + math.exp(-0.2))), -0.1 * (1 - 1 / (1 + math.exp(0.1)))]
    assert policy_chosen.grad.tolist() == pytest.approx(expected, abs=1e-7)


def test_chosen_nll_is_per_token():
    assert dpo.chosen_nll(torch.tensor([-6.0, -1.5]), torch.tensor([3, 1])).tolist() == pytest.approx([2.0, 1.5])


def test_sequence_logps_sums_the_masked_tokens():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [1.0, 1.0, 1.0]],
                           [[2.0, 0.0, -1.0], [0.0, 0.0, 5.0], [0.5, 0.5, 0.0]]])
    labels = torch.tensor([[2, 0, 1], [0, 2, 1]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])

    def logp(row, k):
        return row[k] - math.log(sum(math.exp(x) for x in row))

    rows = logits.tolist()
    expected = [logp(rows[0][1], 0) + logp(rows[0][2], 1), logp(rows[1][0], 0) + logp(rows[1][1], 2)]
    assert dpo.sequence_logps(logits, labels, mask).tolist() == pytest.approx(expected, abs=1e-6)
    assert expected[0] == pytest.approx((3 - math.log(math.exp(3) + 2)) - math.log(3), abs=1e-12)  # -1.1935


# ----------------------------------------------------------------------------------------------------------------
# step log-probs on the tiny model


def batch_of_different_lengths(tokenizer, synthetic_dir):
    pairs = eft_step_pairs(synthetic_dir, 40)
    by_step = {}
    for p in pairs:
        by_step.setdefault(p["step"], p)
    picked = [by_step[k] for k in sorted(by_step)][:3]  # prefixes with 0, 1, 2 previous steps
    tokenized = [dpo.tokenize_pair(tokenizer, p, True) for p in picked]
    prefixes = [t[0] for t in tokenized] + [tokenized[0][0]]
    steps = [t[1] for t in tokenized] + [tokenized[0][2]]
    assert len({len(p) for p in prefixes}) >= 3 and len({len(s) for s in steps}) >= 2
    return prefixes, steps


def test_step_logps_equal_unpadded_forward_per_example(tiny, synthetic_dir):
    model, tokenizer = tiny
    prefixes, steps = batch_of_different_lengths(tokenizer, synthetic_dir)
    with torch.no_grad():
        batched = dpo.step_logps(model, prefixes, steps, tokenizer.pad_token_id)
        expected = []
        for p, s in zip(prefixes, steps):
            logp = model(input_ids=torch.tensor([p + s])).logits[0].double().log_softmax(-1)
            expected.append(sum(logp[len(p) - 1 + i, tok].item() for i, tok in enumerate(s)))
    assert batched.shape == (len(steps),)
    assert batched.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-5)  # fp32 sums of ~50 log-probs
    assert max(expected) < -5  # several tokens of a random model: not a degenerate zero


def test_prefix_gets_zero_gradient_in_the_dpo_loss(tiny, synthetic_dir):
    """
    The last hidden state at position t feeds only the logits at t, which predict token t+1. Its gradient under the
    DPO loss must be exactly zero wherever token t+1 is padding or prefix, and non-zero wherever it is a step token.
    Checked on step_logps itself (left padding, logits_to_keep), with a hook on the final norm.
    """
    model, tokenizer = tiny
    prefixes, steps = batch_of_different_lengths(tokenizer, synthetic_dir)
    prefixes, steps = prefixes[:2] * 2, steps[:2] + steps[2:4]
    captured = {}

    def keep_output(module, inputs, output):
        output.retain_grad()
        captured["hidden"] = output

    handle = model.model.norm.register_forward_hook(keep_output)
    try:
        logps = dpo.step_logps(model, prefixes, steps, tokenizer.pad_token_id)
    finally:
        handle.remove()
    losses, _, _ = dpo.step_dpo_loss(logps[:2], logps[2:], logps[:2].detach() + 0.5, logps[2:].detach() - 0.5, 0.1)
    losses.mean().backward()
    grad = captured["hidden"].grad.abs().sum(-1)  # [B, T]
    T = grad.shape[1]
    for b, (p, s) in enumerate(zip(prefixes, steps)):
        start = T - len(p) - len(s)  # left padding: the sequence occupies the last len(p) + len(s) positions
        predicts_step = [start + len(p) - 1 <= t < T - 1 for t in range(T)]
        for t in range(T):
            if predicts_step[t]:
                assert grad[b, t] > 1e-7, (b, t)
            else:
                assert grad[b, t] == 0, (b, t)
    model.zero_grad(set_to_none=True)


def test_tokenize_pair_eos_only_after_a_final_step(tiny):
    _, tokenizer = tiny
    pair = dict(prompt="Solve step by step. Problem: Tom has 3 pens. He buys 4 more.",
                prefix="Step 1: 4 more: 3 + 4 = 7.\n",
                chosen="Step 2: 2 times as many: 7 * 2 = 14. The answer is \\boxed{14}.",
                rejected="Step 2: 2 times as many: 7 + 2 = 9.", chosen_final=True, rejected_final=False,
                chosen_eos=True, rejected_eos=False)
    prefix_ids, chosen_ids, rejected_ids = dpo.tokenize_pair(tokenizer, pair, final_step_eos=True)
    prefix_text = chat_prompt(tokenizer, pair["prompt"]) + pair["prefix"]
    eos, newline = tokenizer.eos_token_id, ids_of(tokenizer, "\n")
    assert prefix_ids == ids_of(tokenizer, prefix_text)
    assert chosen_ids == ids_of(tokenizer, pair["chosen"]) + [eos]
    assert rejected_ids == ids_of(tokenizer, pair["rejected"]) + newline and eos not in rejected_ids
    assert newline == [ids_of(tokenizer, "a\nb")[1]]  # the newline is one token of its own
    # joined and apart give the same ids, so the step's log-prob is the one the model produced
    assert prefix_ids + rejected_ids == ids_of(tokenizer, prefix_text + pair["rejected"] + "\n")
    assert prefix_ids + chosen_ids[:-1] == ids_of(tokenizer, prefix_text + pair["chosen"])
    _, chosen_plain, _ = dpo.tokenize_pair(tokenizer, pair, final_step_eos=False)
    assert chosen_plain == ids_of(tokenizer, pair["chosen"]) + newline


def test_boxed_step_without_an_emitted_eos_is_scored_with_its_newline(tiny):
    """
    A candidate with \\boxed{} ends the solution (final), but if it was cut at the next "Step" marker or at the
    token limit the model emitted no EOS after it: Step-DPO must not score an EOS the model did not produce.
    From search tree to tokens: make_pairs carries whether each side's EOS was emitted, tokenize_pair obeys it.
    """
    _, tokenizer = tiny
    boxed = "Step 2: 7 * 2 = 14. The answer is \\boxed{14}."
    newline = ids_of(tokenizer, "\n")
    cut = dict(prompt="Solve step by step. Problem: Tom has 3 pens. He buys 4 more.", prefix="Step 1: 3 + 4 = 7.\n",
               chosen=boxed, rejected="Step 2: 7 + 2 = 9.", chosen_final=True, rejected_final=False,
               chosen_eos=False, rejected_eos=False)
    assert dpo.tokenize_pair(tokenizer, cut, final_step_eos=True)[1] == ids_of(tokenizer, boxed) + newline

    def cand(text, eos):
        return dict(text=text, final=eos or "\\boxed" in text, eos=eos, new_tokens=9)
    node = dict(step=2, round=2, prefix_steps=["Step 1: 3 + 4 = 7."], scores=[2, 0, 1], best=0, worst=1,
                outcome="accepted", rolled_back=False, tie=False,
                candidates=[cand(boxed, eos=False), cand("Step 2: 7 + 2 = 9.", eos=False),
                            cand("Step 2: 7 * 2 = 14.", eos=True)])
    tree = dict(id="q", question="Q", prompt="Solve step by step. Problem: Tom has 3 pens. He buys 4 more.",
                steps=[node], finished=True, stop_reason="answer")
    (pair,) = make_pairs.make_pairs([tree])[0]
    assert (pair["chosen_final"], pair["chosen_eos"], pair["rejected_final"], pair["rejected_eos"]) == \
        (True, False, False, False)
    _, chosen_ids, rejected_ids = dpo.tokenize_pair(tokenizer, pair, final_step_eos=True)
    assert chosen_ids == ids_of(tokenizer, boxed) + newline and tokenizer.eos_token_id not in chosen_ids
    assert rejected_ids == ids_of(tokenizer, "Step 2: 7 + 2 = 9.") + newline
    node.update(best=2, scores=[1, 0, 2])  # the step after which the model did emit EOS: scored with it
    (pair,) = make_pairs.make_pairs([tree])[0]
    assert pair["chosen_eos"] is True
    assert dpo.tokenize_pair(tokenizer, pair, final_step_eos=True)[1] == \
        ids_of(tokenizer, "Step 2: 7 * 2 = 14.") + [tokenizer.eos_token_id]


# ----------------------------------------------------------------------------------------------------------------
# the script, in process


def dpo_argv(model, pairs, out, *extra):
    return ["train_step_dpo.py", "--model", model, "--pairs", pairs, "--out", out, "--lr", "1e-2", "--beta", "0.1",
            "--batch-size", "2", "--grad-accum", "1", "--max-len", "512", *extra]


def test_short_dpo_run(tiny, tiny_model_dir, synthetic_dir, tmp_path, monkeypatch, capsys):
    model, tokenizer = tiny
    pairs = eft_step_pairs(synthetic_dir, 6)
    pairs_path = str(tmp_path / "pairs.jsonl")
    with open(pairs_path, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    out = str(tmp_path / "m2")
    monkeypatch.setattr(sys, "argv", dpo_argv(tiny_model_dir, pairs_path, out, "--epochs", "3"))
    dpo.main()
    assert "6 pairs (0 longer than --max-len dropped)" in capsys.readouterr().out

    # the reference is M_t: one record per pair, the log-probs of the untouched model
    ref = read_jsonl(out + ".ref_logps.jsonl", ["id", "ref_chosen", "ref_rejected"])
    assert [r["id"] for r in ref] == [p["id"] for p in pairs]
    tokenized = [dpo.tokenize_pair(tokenizer, p, True) for p in pairs]
    with torch.no_grad():
        expected = dpo.step_logps(model, [t[0] for t in tokenized] * 2,
                                  [t[1] for t in tokenized] + [t[2] for t in tokenized], tokenizer.pad_token_id)
    assert [r["ref_chosen"] for r in ref] + [r["ref_rejected"] for r in ref] == pytest.approx(expected.tolist(),
                                                                                                abs=1e-4)

    log = read_jsonl(os.path.join(out, "train_log.jsonl"), ["loss", "rewards/margins", "rewards/accuracies"])
    assert len(log) == 9  # 3 micro-batches of 2 pairs, 3 epochs, one optimizer step each
    assert log[0]["loss"] == pytest.approx(LOG2, abs=1e-5)  # policy == reference before the first update
    assert log[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    # each step sees other pairs, so single steps are noisy: compare the first and the last epoch
    first_epoch, last_epoch = log[:3], log[-3:]
    assert sum(r["rewards/margins"] for r in last_epoch) / 3 > sum(r["rewards/margins"] for r in first_epoch) / 3 + 0.1
    assert sum(r["loss"] for r in last_epoch) / 3 < LOG2 - 0.01  # below the starting loss (measured 0.657)
    assert sum(r["rewards/accuracies"] for r in last_epoch) / 3 > 0.5
    assert json.load(open(os.path.join(out, "dpo_config.json")))["beta"] == 0.1

    # the trained policy now prefers the chosen steps more than the reference did
    trained, _ = load_model(out)
    with torch.no_grad():
        after = dpo.step_logps(trained.eval(), [t[0] for t in tokenized] * 2,
                               [t[1] for t in tokenized] + [t[2] for t in tokenized], tokenizer.pad_token_id)
    n = len(pairs)
    margins = (after[:n] - expected[:n]) - (after[n:] - expected[n:])
    assert margins.mean() > 1.0  # log-ratio margin in nats, averaged over the pairs (measured: 2.8)

    weights = os.path.join(out, "model.safetensors")
    mtime = os.path.getmtime(weights)
    dpo.main()
    assert "skipping" in capsys.readouterr().out
    assert os.path.getmtime(weights) == mtime


def test_overwrite_recomputes_the_reference(tiny_model_dir, synthetic_dir, tmp_path, monkeypatch):
    """
    --overwrite redoes the stage, so π_ref must be the --model of this run. Here the stage is first run from M0,
    then redone with --overwrite from another model (M0 after a DPO run, as after `OVERWRITE=1 bash iterate.sh`
    retrains M_t): at step 0 policy == reference again, so the first loss must be log 2.
    """
    pairs_path = str(tmp_path / "pairs.jsonl")
    with open(pairs_path, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in eft_step_pairs(synthetic_dir, 4))
    other, out = str(tmp_path / "other"), str(tmp_path / "m2")
    monkeypatch.setattr(sys, "argv", dpo_argv(tiny_model_dir, pairs_path, other, "--epochs", "2"))
    dpo.main()
    monkeypatch.setattr(sys, "argv", dpo_argv(tiny_model_dir, pairs_path, out, "--epochs", "1"))
    dpo.main()
    first = read_jsonl(os.path.join(out, "train_log.jsonl"))[0]
    assert first["loss"] == pytest.approx(LOG2, abs=1e-5)
    monkeypatch.setattr(sys, "argv", dpo_argv(other, pairs_path, out, "--epochs", "1", "--overwrite"))
    dpo.main()
    first = read_jsonl(os.path.join(out, "train_log.jsonl"))[0]
    assert first["loss"] == pytest.approx(LOG2, abs=1e-5), "stale reference log-probs reused under --overwrite"


def test_step_bounds_put_every_micro_batch_in_one_step():
    for n in range(1, 40):
        for accum in (1, 2, 3):
            bounds = dpo.step_bounds(n, accum)
            assert [b - a for a, b in zip(bounds, bounds[1:])] == [accum] * (n // accum) + [n % accum] * (n % accum > 0)
        for steps in (1, 3, 16, 50):
            bounds = dpo.step_bounds(n, 2, steps)
            sizes = [b - a for a, b in zip(bounds, bounds[1:])]
            assert bounds[0] == 0 and bounds[-1] == n and len(sizes) == min(steps, n)
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_steps_fix_the_number_of_updates(tiny_model_dir, synthetic_dir, tmp_path, monkeypatch):
    """--steps K: K optimizer steps an epoch whatever the number of pairs (never more than its micro-batches)."""
    pairs_path = str(tmp_path / "pairs.jsonl")
    with open(pairs_path, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in eft_step_pairs(synthetic_dir, 7))
    for steps, epochs, expected in [("3", "1", 3), ("3", "2", 6), ("10", "1", 4)]:  # 4 micro-batches of 2 pairs
        out = str(tmp_path / f"m2-{steps}-{epochs}")
        monkeypatch.setattr(sys, "argv", dpo_argv(tiny_model_dir, pairs_path, out, "--steps", steps, "--epochs", epochs))
        dpo.main()
        assert len(read_jsonl(os.path.join(out, "train_log.jsonl"))) == expected


def test_no_pairs_ends_instead_of_looping_forever(tiny_model_dir, tmp_path, monkeypatch):
    """A search that yields no pair (every step tied or single) leaves an empty pairs file; the stage must end."""
    pairs_path = tmp_path / "pairs.jsonl"
    pairs_path.write_text("")

    monkeypatch.setattr(sys, "argv", dpo_argv(tiny_model_dir, str(pairs_path), str(tmp_path / "m2")))
    ends_within(10, dpo.main, "train_step_dpo.main() on an empty pairs file")


def test_nll_weight_keeps_the_chosen_step_likely(tiny, tiny_model_dir, synthetic_dir, tmp_path, monkeypatch):
    """--nll-weight (Iterative RPO's term): same pairs, same seed; the chosen steps end more likely than without."""
    model, tokenizer = tiny
    pairs = eft_step_pairs(synthetic_dir, 6)
    pairs_path = str(tmp_path / "pairs.jsonl")
    with open(pairs_path, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    tokenized = [dpo.tokenize_pair(tokenizer, p, True) for p in pairs]
    chosen_logps = {}
    for name, extra in [("plain", []), ("nll", ["--nll-weight", "1.0"])]:
        out = str(tmp_path / name)
        monkeypatch.setattr(sys, "argv", dpo_argv(tiny_model_dir, pairs_path, out, "--epochs", "3", *extra))
        dpo.main()
        log = read_jsonl(os.path.join(out, "train_log.jsonl"), ["loss", "logps/chosen", "logps/rejected"])
        # step 0, policy == reference: log 2, plus the chosen steps' per-token NLL when the term is on
        assert (log[0]["loss"] == pytest.approx(LOG2, abs=1e-5)) if name == "plain" else log[0]["loss"] > LOG2 + 0.05
        trained, _ = load_model(out)
        with torch.no_grad():
            logps = dpo.step_logps(trained.eval(), [t[0] for t in tokenized], [t[1] for t in tokenized],
                                   tokenizer.pad_token_id)
        chosen_logps[name] = logps.mean().item()
    assert chosen_logps["nll"] > chosen_logps["plain"] + 0.5  # summed over each step (measured: -93 vs -133)
