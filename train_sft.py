"""
M0 -> M1 (paper §3.2 "Initialization"): supervised fine-tuning on IFT data (question -> step-by-step solution)
mixed with EFT data (question + previous steps + two candidate next steps -> explanation + [[A]]/[[B]]), so one
model both reasons step by step and judges steps. Loss on response tokens only (the prompt is masked; the paper does
not say, a choice here).

Reads (every field a string, previous_steps a list of strings; a wrong type stops the run before the model loads):
  --ift  JSONL {question, solution}                                   solution = "Step 1: ...\\nStep 2: ..."
  --eft  JSONL {question, previous_steps, step_a, step_b, judgment}   judgment ends with [[A]] or [[B]]
  --srlm-eft JSONL {question, response, judgment}  optional: the SRLM baseline's judge (generate.py --mode srlm;
         Yuan et al. 2024), a whole solution scored with --prompt-srlm-judge, judgment ending "Score: k"
Writes --out: a model directory (full weights, or the LoRA adapter under --lora), train_log.jsonl, sft_config.json
and manifest.json (what made it: model, data and prompts by content, the flags), all renamed into place at once.

    python train_sft.py --model runs/default/m0 --ift data/synthetic/ift.jsonl --eft data/synthetic/eft.jsonl \\
        --out runs/default/m1 --prompt-reasoning reasoning_tiny --prompt-judge judge_tiny
    # paper scale, one GPU (QLoRA):
    python train_sft.py --model Qwen/Qwen2.5-Math-7B --ift data/real/ift.jsonl --eft data/real/eft.jsonl \\
        --out runs/qwen7b/m1 --load-in-4bit --gradient-checkpointing --lr 1e-4 --epochs 3 --batch-size 4 --grad-accum 8
    # two GPUs (DDP): torchrun --nproc_per_node 2 train_sft.py ... (same flags)
"""

import argparse
import random
import time

import torch

from common import (DataError, add_training_args, chat_prompt, cli, fraction, is_done, judge_context, load_prompt,
                    nonnegative_float, output_flags, positive_float, positive_int, prompt_path, read_jsonl,
                    stage_manifest)
from modeling import load_for_training, padded_batch, prepare_for_training, rank_slice, save_trained, train_loop


IFT_FIELDS = {"question": str, "solution": str}
EFT_FIELDS = {"question": str, "previous_steps": list[str], "step_a": str, "step_b": str, "judgment": str}
SRLM_EFT_FIELDS = {"question": str, "response": str, "judgment": str}


def sft_example(tokenizer, prompt_text, response_text, max_len):
    """input_ids = prompt_ids + response_ids + [eos]; loss_mask = 0 on the prompt, 1 on the response and EOS."""
    prompt_ids = tokenizer(chat_prompt(tokenizer, prompt_text), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_len]
    mask = ([0] * len(prompt_ids) + [1] * len(response_ids))[:max_len]
    return ids, mask


def build_examples(tokenizer, ift, eft, reasoning, judge, max_len, srlm_eft=(), srlm_judge=None):
    examples = [sft_example(tokenizer, reasoning.format(problem=r["question"]), r["solution"], max_len)
                for r in ift]
    examples += [sft_example(tokenizer, judge.format(context=judge_context(r["question"], r["previous_steps"]),
                                                     step_a=r["step_a"], step_b=r["step_b"]),
                             r["judgment"], max_len) for r in eft]
    examples += [sft_example(tokenizer, srlm_judge.format(question=r["question"], response=r["response"]),
                             r["judgment"], max_len) for r in srlm_eft]
    return [e for e in examples if sum(e[1]) > 0]  # an example truncated to its prompt teaches nothing


def batches(examples, batch_size, rng):
    """Shuffled batches of similar length (sorted within chunks of 50 batches) so little compute goes to padding."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    chunk = batch_size * 50
    out = []
    for c in range(0, len(order), chunk):
        part = sorted(order[c:c + chunk], key=lambda i: len(examples[i][0]))
        out += [part[b:b + batch_size] for b in range(0, len(part), batch_size)]
    rng.shuffle(out)
    return out


def masked_nll(logits, input_ids, loss_mask):
    """Mean negative log-likelihood of the response tokens (next-token prediction, prompt masked out)."""
    logits, labels, mask = logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:].float()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
    return (nll * mask.flatten()).sum() / mask.sum().clamp(min=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ift", required=True)
    parser.add_argument("--eft", default=None, help="judge data; without it M1 cannot judge")
    parser.add_argument("--srlm-eft", default=None, help="whole-solution scoring data (the SRLM baseline's judge)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompt-reasoning", default="reasoning", help="paper Fig. 4; the tiny default: reasoning_tiny")
    parser.add_argument("--prompt-judge", default="judge", help="paper Fig. 5; the tiny default: judge_tiny")
    parser.add_argument("--prompt-srlm-judge", default="srlm_judge",
                        help="with --srlm-eft: Yuan et al. 2024 Fig. 2; the tiny default: srlm_judge_tiny")
    parser.add_argument("--epochs", type=positive_float, default=3, help="paper: 3")
    parser.add_argument("--lr", type=positive_float, default=1e-6, help="paper: 1e-6 (full fine-tuning of 7B)")
    parser.add_argument("--weight-decay", type=nonnegative_float, default=0.0)
    parser.add_argument("--warmup", type=fraction, default=0.03, help="fraction of steps (not stated in the paper)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="examples per process per micro-batch")
    parser.add_argument("--grad-accum", type=positive_int, default=1,
                        help="paper batch 32 = batch-size x grad-accum x GPUs")
    parser.add_argument("--max-len", type=positive_int, default=2048)
    parser.add_argument("--limit", type=positive_int, default=None, help="use only the first N records of each file")
    parser.add_argument("--limit-eft", type=positive_int, default=None,
                        help="the first N EFT records, of each kind (default: --limit)")
    add_training_args(parser)
    args = parser.parse_args()
    inputs = dict(model=args.model, ift=args.ift, eft=args.eft, prompt_reasoning=prompt_path(args.prompt_reasoning),
                  prompt_judge=prompt_path(args.prompt_judge), srlm_eft=args.srlm_eft,
                  prompt_srlm_judge=prompt_path(args.prompt_srlm_judge) if args.srlm_eft else None)
    manifest = stage_manifest("train_sft", inputs, output_flags(args))
    if is_done(args.out, manifest, args.overwrite, [args.out.rstrip("/") + ".tmp"]):
        return
    ift = read_jsonl(args.ift, IFT_FIELDS)[:args.limit]
    eft_limit = args.limit if args.limit_eft is None else args.limit_eft
    eft = read_jsonl(args.eft, EFT_FIELDS)[:eft_limit] if args.eft else []
    srlm_eft = read_jsonl(args.srlm_eft, SRLM_EFT_FIELDS)[:eft_limit] if args.srlm_eft else []
    rank, world, model, tokenizer = load_for_training(args)
    model = prepare_for_training(model, args)
    examples = build_examples(tokenizer, ift, eft, load_prompt(args.prompt_reasoning), load_prompt(args.prompt_judge),
                              args.max_len, srlm_eft, load_prompt(args.prompt_srlm_judge) if srlm_eft else None)
    dropped = len(ift) + len(eft) + len(srlm_eft) - len(examples)
    if not examples:
        raise DataError(f"no SFT example left to train on (are --ift/--eft empty, or --max-len {args.max_len} too short?)")
    examples = rank_slice(examples, rank, world)
    rng = random.Random(args.seed)
    steps_per_epoch = len(batches(examples, args.batch_size, rng)) // args.grad_accum
    total_steps = max(1, int(steps_per_epoch * args.epochs))
    if rank == 0:
        srlm_count = f" + {len(srlm_eft)} SRLM EFT" if srlm_eft else ""
        print(f"{len(ift)} IFT + {len(eft)} EFT{srlm_count} records, {dropped} dropped (prompt alone >= --max-len "
              f"{args.max_len}), {total_steps} optimizer steps, "
              f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable parameters")

    def groups():  # grad_accum micro-batches per optimizer step, reshuffled every epoch
        micro = []
        while True:
            for batch in batches(examples, args.batch_size, rng):
                micro.append(batch)
                if len(micro) == args.grad_accum:
                    yield micro
                    micro = []

    def micro_loss(train_model, mb, group):
        ids, att, pos, mask = padded_batch([examples[i][0] for i in mb], tokenizer.pad_token_id,
                                           [examples[i][1] for i in mb])
        ids, att, pos, mask = (t.to(model.device) for t in (ids, att, pos, mask))
        logits = train_model(input_ids=ids, attention_mask=att, position_ids=pos).logits
        loss = masked_nll(logits, ids, mask) / len(group)
        return loss, dict(loss=loss.item(), tokens=int(att.sum()))

    t0 = time.time()
    log = train_loop(model, args, groups(), micro_loss, total_steps, world, "sft", args.weight_decay)
    if rank == 0:
        save_trained(model, tokenizer, args.out, log, args, "sft_config.json", manifest)
        print(f"trained {len(log)} steps in {time.time() - t0:.0f}s, final loss {log[-1]['loss']:.4f}")
    if world > 1:
        torch.distributed.barrier()


if __name__ == "__main__":
    cli(main)
