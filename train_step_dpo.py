"""
Step-wise DPO (paper §3.4, Eqs. 6-8): M_t -> M_{t+1} on the step-level preference pairs M_t made for itself.

    A = β log π_θ(s_best | x, s_<l) / π_ref(s_best | x, s_<l)
    B = β log π_θ(s_worst | x, s_<l) / π_ref(s_worst | x, s_<l)
    L = -E[ log σ(A - B) ]

The prompt is the question plus the previous steps; only the next step's tokens are scored (summed log-probs):
input_ids = prefix_ids + step_ids, loss_mask = [0] * len(prefix_ids) + [1] * len(step_ids). π_ref is M_t itself:
its log-probs are computed once, in a no-grad pass before training, and stored with the pairs. (Under LoRA the
"adapter disabled" model is the bare base M0, the wrong reference after the first iteration.)

Not stated by the paper, chosen here (flags):
  --beta 0.1       Step-DPO (Lai et al. 2024) used 0.05-0.5; 0.1 is the DPO paper's common default.
  --nll-weight 0    off (the paper's plain DPO). α > 0 adds α · chosen_nll (per token) to each pair's loss, the
                   Iterative RPO fix for reasoning DPO; measured on the tiny default: see README.
  --no-final-step-eos  by default a step after which the model emitted EOS is scored with that EOS, so DPO also
                   teaches when to stop; every other step -- an intermediate one, or one with \\boxed{} that was cut
                   at the next "Step" marker or at the token limit -- is scored with its trailing newline (how it
                   reads in the next step's prefix), never with an EOS the model did not produce (as in Step-DPO).
  --steps K        off (the paper's fixed batch, 32 = batch-size x grad-accum x GPUs). K: K optimizer steps an epoch,
                   the batch growing with the pairs (the tiny default: 16); with fewer than K x batch-size pairs, one
                   step per micro-batch.

Reads  --pairs JSONL {id, prompt, prefix, chosen, rejected, chosen_eos, rejected_eos, ...}  (make_pairs.py; ids
       unique, texts strings, *_eos booleans)
Writes --out   a model directory (full weights, or the LoRA adapter), train_log.jsonl, dpo_config.json and
               manifest.json (what made it), renamed into place at once; next to it <out>.ref_logps.jsonl, π_ref's
               log-probs {id, ref_chosen, ref_rejected}, with their own manifest: reused by a resumed run only if
               made from the same model, pairs and tokenization.

    python train_step_dpo.py --model runs/default/m1 --pairs runs/default/iter1/pairs.jsonl \\
        --out runs/default/m2 --lr 1e-5 --beta 0.1
    # paper scale on one GPU (QLoRA): add --load-in-4bit --gradient-checkpointing; two GPUs: torchrun --nproc_per_node 2
"""

import argparse
import json
import os
import random
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (PartialJSONL, add_training_args, chat_prompt, cli, fraction, is_done, nonnegative_float,
                    output_flags, positive_float, positive_int, read_jsonl, stage_manifest, write_manifest)
from modeling import load_for_training, padded_batch, prepare_for_training, rank_slice, save_trained, train_loop

PAIR_FIELDS = {"id": (str, int), "prompt": str, "prefix": str, "chosen": str, "rejected": str, "chosen_eos": bool,
               "rejected_eos": bool}


def sequence_logps(logits, labels, loss_mask):
    """
    Summed log-probabilities of the masked tokens: log π(step | prefix) = Σ_t log p(y_t | y_<t).
    logits [B, T, V] where logits[:, t] predicts labels[:, t]; labels, loss_mask [B, T] -> [B]
    """
    logps = torch.gather(logits.float().log_softmax(-1), 2, labels.unsqueeze(-1)).squeeze(-1)
    return (logps * loss_mask).sum(-1)


def step_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """
    Eqs. 6-8. Inputs [B] summed step log-probs. Returns (losses [B], chosen rewards A [B], rejected rewards B [B]).
    When policy == reference, A = B = 0 and the loss is log 2.
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)        # A, Eq. 6
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)  # B, Eq. 7
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)               # Eq. 8
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def chosen_nll(policy_chosen_logps, chosen_lengths):
    """
    Per-token negative log-likelihood of the chosen step, [B] (the NLL term of Iterative RPO, Pang et al. 2024).
    Not in the paper (--nll-weight, 0 = off): DPO alone can lower log π(chosen) along with log π(rejected).
    """
    return -policy_chosen_logps / chosen_lengths


def tokenize_pair(tokenizer, pair, final_step_eos):
    """
    prefix_ids = tok(chat(prompt) + prefix); step_ids = tok(step) + [eos] if the model emitted EOS after the step
    (pair["chosen_eos"] / ["rejected_eos"]), else tok(step + "\\n").
    The boundary is "\\n" | "Step", where byte-level BPE pre-tokenizers split anyway, so
    tok(prefix + step) == tok(prefix) + tok(step) (checked in tests, also with a real BPE tokenizer).
    """
    prefix_ids = tokenizer(chat_prompt(tokenizer, pair["prompt"]) + pair["prefix"], add_special_tokens=False)["input_ids"]

    def step_ids(text, emitted_eos):
        if emitted_eos and final_step_eos:
            return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return tokenizer(text + "\n", add_special_tokens=False)["input_ids"]

    return prefix_ids, step_ids(pair["chosen"], pair["chosen_eos"]), step_ids(pair["rejected"], pair["rejected_eos"])


def step_logps(model, prefixes, steps, pad_id):
    """
    Summed log π(step | prefix) for each (prefix_ids, step_ids). Left padding puts every step at the end of the
    batch, so only the last max_step_len + 1 positions need logits (logits_to_keep): the vocabulary projection, the
    largest activation of a 150k-vocabulary model, is never computed over the prefix.
    """
    seqs = [p + s for p, s in zip(prefixes, steps)]
    masks = [[0] * len(p) + [1] * len(s) for p, s in zip(prefixes, steps)]
    ids, att, pos, mask = (t.to(model.device) for t in padded_batch(seqs, pad_id, masks, left=True))
    keep = max(len(s) for s in steps) + 1
    logits = model(input_ids=ids, attention_mask=att, position_ids=pos, logits_to_keep=keep).logits
    # logits[:, k] predicts the token after it: align the kept logits with the last keep - 1 tokens
    return sequence_logps(logits[:, :-1], ids[:, -keep + 1:], mask[:, -keep + 1:].float())


@torch.no_grad()
def reference_logps(model, examples, pad_id, batch_size, out_path, manifest):
    """
    π_ref = M_t: one no-grad pass over all pairs before any update; stored (and resumable) next to the model, and
    reused only if made by this manifest: log-probs of other pairs or another model stop the run (common.is_done).
    """
    if is_done(out_path, manifest, overwrite=False):
        return {r["id"]: r for r in read_jsonl(out_path, {"id": (str, int), "ref_chosen": float,
                                                          "ref_rejected": float})}
    model.eval()
    store = PartialJSONL(out_path, manifest)
    todo = [e for e in examples if e["id"] not in store.done]
    for b in tqdm(range(0, len(todo), batch_size), desc="reference log-probs", disable=not todo):
        batch = todo[b:b + batch_size]
        logps = step_logps(model, [e["prefix_ids"] for e in batch] * 2,
                           [e["chosen_ids"] for e in batch] + [e["rejected_ids"] for e in batch], pad_id)
        n = len(batch)
        store.add([dict(id=e["id"], ref_chosen=logps[k].item(), ref_rejected=logps[n + k].item())
                   for k, e in enumerate(batch)])
    store.finish([e["id"] for e in examples])
    write_manifest(out_path, manifest)
    model.train()
    return store.done


def step_bounds(n, grad_accum, steps=None):
    """
    Where each optimizer step's micro-batches start in an epoch of n, then n: every grad_accum-th (the last step may
    take fewer), or, with steps, that many steps (at most n) whose sizes differ by at most one micro-batch.
    """
    if steps:
        return [round(k * n / min(steps, n)) for k in range(min(steps, n) + 1)]
    return list(range(0, n, grad_accum)) + [n]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--beta", type=positive_float, default=0.1,
                        help="not stated in the paper; Step-DPO used 0.05-0.5")
    parser.add_argument("--lr", type=positive_float, default=5e-7, help="paper: 5e-7 (full fine-tuning of 7B)")
    parser.add_argument("--epochs", type=positive_float, default=1, help="paper: 1")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="pairs per process per micro-batch")
    parser.add_argument("--grad-accum", type=positive_int, default=4,
                        help="paper batch 32 = batch-size x grad-accum x GPUs")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="optimizer steps per epoch, the batch growing with the pairs (at most one step per micro-batch "
                             "of --batch-size pairs); replaces --grad-accum (the paper keeps batch 32); default: a "
                             "step per grad-accum micro-batches")
    parser.add_argument("--warmup", type=fraction, default=0.1, help="fraction of steps (not stated in the paper)")
    parser.add_argument("--nll-weight", type=nonnegative_float, default=0.0,
                        help="α of an added per-token NLL of the chosen step (deviation; 0 = the paper's DPO)")
    parser.add_argument("--no-final-step-eos", action="store_true",
                        help="score a step without the EOS the model emitted after it")
    parser.add_argument("--max-len", type=positive_int, default=2048,
                        help="pairs whose prefix + step is longer are dropped")
    add_training_args(parser)
    args = parser.parse_args()
    inputs = dict(model=args.model, pairs=args.pairs)
    manifest = stage_manifest("train_step_dpo", inputs, output_flags(args))
    # π_ref's log-probs depend on the model, the pairs, their tokenization and this rank's slice of them
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    ref_path = f"{args.out.rstrip('/')}.ref_logps{'' if world == 1 else f'.rank{rank}'}.jsonl"
    ref_manifest = stage_manifest("train_step_dpo reference", inputs, dict(
        no_final_step_eos=args.no_final_step_eos, max_len=args.max_len, load_in_4bit=args.load_in_4bit,
        attn=args.attn, world_size=world))
    if is_done(args.out, manifest, args.overwrite, [args.out.rstrip("/") + ".tmp", ref_path, ref_path + ".partial",
                                                   ref_path + ".manifest.json"]):
        return
    pairs = read_jsonl(args.pairs, PAIR_FIELDS, unique="id")
    rank, world, model, tokenizer = load_for_training(args)
    examples = []
    for p in pairs:
        prefix_ids, chosen_ids, rejected_ids = tokenize_pair(tokenizer, p, not args.no_final_step_eos)
        if len(prefix_ids) + max(len(chosen_ids), len(rejected_ids)) <= args.max_len:
            examples.append(dict(id=p["id"], prefix_ids=prefix_ids, chosen_ids=chosen_ids, rejected_ids=rejected_ids))
    if rank == 0:
        print(f"{len(examples)} pairs ({len(pairs) - len(examples)} longer than --max-len dropped)")
    if not examples:  # every step tied or had one distinct candidate: there is nothing to prefer
        print(f"WARNING: {args.pairs} holds no preference pair: M_t+1 = M_t, saved unchanged")
        if rank == 0:
            save_trained(model, tokenizer, args.out, [], args, "dpo_config.json", manifest)
        return
    examples = rank_slice(examples, rank, world)
    ref = reference_logps(model, examples, tokenizer.pad_token_id, args.batch_size, ref_path, ref_manifest)
    model = prepare_for_training(model, args)
    rng = random.Random(args.seed)
    micro_batches = [examples[b:b + args.batch_size] for b in range(0, len(examples), args.batch_size)]
    bounds = step_bounds(len(micro_batches), args.grad_accum, args.steps)
    total_steps = max(1, round((len(bounds) - 1) * args.epochs))

    def groups():  # the micro-batches of each optimizer step, reshuffled every epoch
        while True:
            rng.shuffle(micro_batches)
            for g0, g1 in zip(bounds, bounds[1:]):
                yield micro_batches[g0:g1]

    def micro_loss(train_model, mb, group):
        """Eqs. 6-8 on one micro-batch: chosen and rejected steps in one forward pass, π_ref from the stored pass."""
        n, n_pairs = len(mb), sum(len(m) for m in group)
        logps = step_logps(train_model, [e["prefix_ids"] for e in mb] * 2,
                           [e["chosen_ids"] for e in mb] + [e["rejected_ids"] for e in mb], tokenizer.pad_token_id)
        ref_c = torch.tensor([ref[e["id"]]["ref_chosen"] for e in mb], device=logps.device)
        ref_r = torch.tensor([ref[e["id"]]["ref_rejected"] for e in mb], device=logps.device)
        losses, chosen_r, rejected_r = step_dpo_loss(logps[:n], logps[n:], ref_c, ref_r, args.beta)
        if args.nll_weight:
            lengths = torch.tensor([len(e["chosen_ids"]) for e in mb], device=logps.device)
            losses = losses + args.nll_weight * chosen_nll(logps[:n], lengths)
        return losses.sum() / n_pairs, {
            "loss": losses.sum().item() / n_pairs, "rewards/chosen": chosen_r.sum().item() / n_pairs,
            "rewards/rejected": rejected_r.sum().item() / n_pairs,
            "rewards/margins": (chosen_r - rejected_r).sum().item() / n_pairs,
            "rewards/accuracies": (chosen_r > rejected_r).float().sum().item() / n_pairs,
            "logps/chosen": logps[:n].detach().sum().item() / n_pairs,
            "logps/rejected": logps[n:].detach().sum().item() / n_pairs}

    t0 = time.time()
    log = train_loop(model, args, groups(), micro_loss, total_steps, world, "step-dpo")
    if rank == 0:
        save_trained(model, tokenizer, args.out, log, args, "dpo_config.json", manifest)
        print(f"{len(log)} steps in {time.time() - t0:.0f}s; last: " + json.dumps(log[-1]))
    if world > 1:
        torch.distributed.barrier()


if __name__ == "__main__":
    cli(main)
