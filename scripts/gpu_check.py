"""
A ready GPU check: what the paper's models cost on one GPU, measured in one call of at most 8 minutes, offline.

The models are Qwen2.5-Math-7B and -1.5B (the project's M0 sizes), built from their exact configurations (written
below as numbers) with random weights, so nothing is downloaded. For each size it measures:
  (a) Step-DPO (paper §3.4, Eqs. 6-8) under 4-bit QLoRA with gradient checkpointing: peak GPU memory (allocated and
      reserved) and seconds per optimizer step at each --seq-lens, --pairs 1 (one prefix with a chosen and a
      rejected step), reference log-probs precomputed in a no-grad pass, the loss from train_step_dpo;
  (b) tokens/s of HF generate for step candidates (w candidates x questions, sampled) and for judge prompts
      (greedy), in bf16 and in 4 bit with the LoRA adapter on (M_t under QLoRA), and the judge once more with
      --prefill-chunk (the paper preset's chunked prefill), for its cost in speed;
  (c) that the adapter trains: every LoRA tensor changed, the base weights did not, and the loss starts at log 2;
  (d) the settings that fit 24, 40 and 80 GB cards, from the measured peaks;
  (e) hours per iteration of the paper's loop (400/800/1,200 questions), estimated from the measured parts: the
      search's token count (the paper's measured solution shape, w, both orders; see search_tokens) over the
      measured 4-bit+LoRA tokens/s, plus Step-DPO at the measured seconds per step;
  (f) where vllm is importable, the same for the vLLM engine (--engine vllm, vllm_engine.py): the base from its
      config with random weights (load_format="dummy"), the adapter trained in (c) applied as vllm_engine serves
      M_t (LoRARequest), loaded as the search loads it: a chunk's candidates (--vllm-questions x w, sampled, one
      seed each) and a chunk's judge comparisons at once (each question's C(w,2) x orders prompts sharing their
      first judge_prompt_tokens - 2 x step_tokens tokens, as a step's judge prompts share question and steps);
      its engine start apart; and hours per iteration with its tokens/s.
Writes --out (JSON), rewritten after every measurement, so a run cut short still leaves what it measured.
scripts/estimate_memory.py estimates the same Step-DPO rows on a CPU (scripts/estimate_memory.json); after a run,
`python -m scripts.estimate_memory --compare gpu_check.json` prints the two side by side.
Random weights never stop early: generation lengths are fixed with min_new_tokens = max_new_tokens.

Here, once (the GPU machine has no network):  bash scripts/fetch_gpu_wheels.sh
On the GPU machine (one device run with carry [".whl"] and a timeout of 480 s):
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 -m scripts.gpu_check --out $OUT/gpu_check.json
On CPU, every code path but bitsandbytes, in seconds:
    python -m scripts.gpu_check --tiny --out /tmp/gpu_check.json
"""

import argparse
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import sys
import tempfile
import time

import torch

import modeling
import vllm_engine
from common import DataError, cli, write_json
from train_step_dpo import sequence_logps, step_dpo_loss

# config.json of Qwen/Qwen2.5-Math-7B and Qwen/Qwen2.5-Math-1.5B (Qwen2ForCausalLM; q/k/v projections have biases)
QWEN25_MATH = {
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}
BOTH = dict(max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6, hidden_act="silu",
            use_sliding_window=False, attention_dropout=0.0, bos_token_id=151643, eos_token_id=151643)
# --tiny: the same architecture (and tying) shrunk so the whole script runs on CPU in seconds
# (head dim 32: vLLM's CPU attention has no smaller one)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=1024, bos_token_id=1023, eos_token_id=1023)
# flags left unset: (GPU value, --tiny value)
SHAPES = dict(seq_lens=("512,1024,2048", "32,64"), step_tokens=(128, 8), questions=(16, 2), prompt_tokens=(256, 16),
              judge_batch=(96, 12), judge_prompt_tokens=(600, 32), new_tokens=(64, 8), prefill_chunk=(256, 8),
              vllm_questions=(32, 4))
CHUNKED_JUDGE = "judge, chunked prefill"
# GiB a program can allocate on a card of each size (an L4/A10 "24 GB" shows ~22.5 GiB), less the CUDA context
BUDGETS_GIB = {"24GB": 22.0, "40GB": 39.0, "80GB": 78.5}
GIB = 2 ** 30
# The search's shape for the time estimate: 7B M1 writes 9.35 steps of 61.6 tokens on MATH (the paper's step analysis;
# M4: 5.21 of 113.1, about the same tokens per solution). The judge's explanation length is not reported: ours,
# --judge-tokens (assumed 300).
PAPER_STEPS, PAPER_STEP_TOKENS = 9.35, 61.6
T0 = time.perf_counter()  # reset by main()


def log(msg):
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak():
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()  # so the reserved peak is this measurement's, not the last one's
        torch.cuda.reset_peak_memory_stats()


def peaks():
    cuda = torch.cuda.is_available()
    return dict(peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB if cuda else 0.0,
                peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB if cuda else 0.0)


def build_model(size, tiny, device, dtype, attn="sdpa", **overrides):
    """
    Qwen2ForCausalLM from the config with random weights, created straight on the GPU (seconds for the 7B; no
    15 GB host copy or disk round trip). The 4-bit model is made from this one by quantize_nf4_in_place.
    """
    from transformers import AutoModelForCausalLM, Qwen2Config
    config = Qwen2Config(**{**BOTH, **QWEN25_MATH[size], **(TINY if tiny else {}), **overrides})
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


def quantize_nf4_in_place(model):
    """
    Every nn.Linear but lm_head -> bitsandbytes Linear4bit with modeling.bnb_4bit_config() (NF4, double quantization,
    bf16 compute), as from_pretrained(..., quantization_config=bnb_4bit_config()) would build it; embeddings, norms
    and lm_head stay bf16 as there. This skips writing 15 GB to disk and loading it back (~2 min); Params4bit
    quantizes on its .to(cuda), seconds in all. is_loaded_in_4bit is the flag from_pretrained sets and PEFT reads to
    put its 4-bit LoRA layers on.
    """
    import bitsandbytes as bnb
    q = modeling.bnb_4bit_config()
    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and not n.endswith("lm_head")]
    for name in names:
        linear = model.get_submodule(name)
        nf4 = dict(compress_statistics=q.bnb_4bit_use_double_quant, quant_type=q.bnb_4bit_quant_type,
                   quant_storage=q.bnb_4bit_quant_storage)
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                compute_dtype=q.bnb_4bit_compute_dtype, device="meta", **nf4)
        new.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, module=new, **nf4).to(
            linear.weight.device)
        if linear.bias is not None:
            new.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        model.set_submodule(name, new)
        del linear  # the bf16 weight goes as soon as its module does
    model.is_loaded_in_4bit = True
    reset_peak()
    return model


def prepare_lora(model, args, load_in_4bit, checkpointing=True):
    """The trainers' setup (modeling.prepare_for_training: LoRA r=args.lora_rank on all linear layers)."""
    train_args = argparse.Namespace(lora=True, lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_layers=0,
                                    lora_dropout=0.0, load_in_4bit=load_in_4bit, gradient_checkpointing=checkpointing,
                                    optim="adamw")
    return modeling.prepare_for_training(model, train_args), train_args


def dpo_batch(pairs, seq_len, step_tokens, vocab, device):
    """
    Rows prefix_i + chosen_i (i < pairs), then prefix_i + rejected_i, each seq_len tokens; the loss mask covers the
    step. Random token ids: the cost does not depend on them.
    """
    prefixes = [torch.randint(vocab, (seq_len - step_tokens,)).tolist() for _ in range(pairs)] * 2
    steps = [torch.randint(vocab, (step_tokens,)).tolist() for _ in range(2 * pairs)]
    masks = [[0] * len(p) + [1] * len(s) for p, s in zip(prefixes, steps)]
    ids, att, pos, loss_mask = modeling.padded_batch([p + s for p, s in zip(prefixes, steps)], pad_id=0, loss_masks=masks)
    return ids.to(device), att.to(device), pos.to(device), loss_mask.to(device)


def step_logps(model, ids, att, pos, loss_mask, step_tokens):
    """
    log pi(step | prefix) per row, summed over the step's tokens, as train_step_dpo.step_logps computes it: logits
    only for the last step_tokens + 1 positions (logits_to_keep), never the [2, T, 152k] logits of the whole pair.
    """
    logits = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=False,
                   logits_to_keep=step_tokens + 1).logits
    return sequence_logps(logits[:, :-1], ids[:, -step_tokens:], loss_mask[:, -step_tokens:])


def measure_step_dpo(model, optimizer, seq_len, args, vocab, device):
    batch, n = dpo_batch(args.pairs, seq_len, args.step_tokens, vocab, device), args.pairs
    reset_peak()
    start = time.perf_counter()
    with torch.no_grad():  # reference log-probs, precomputed as the trainer does (policy == reference here)
        ref = step_logps(model, *batch, args.step_tokens)
    sync()
    ref_seconds, times, losses = time.perf_counter() - start, [], []
    for i in range(1 + args.steps):  # step 0 is a warm-up, not timed
        start = time.perf_counter()
        policy = step_logps(model, *batch, args.step_tokens)
        loss = step_dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], args.beta)[0].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if i == 0:  # weights, LoRA and optimizer state: what stays between steps
            static = torch.cuda.memory_allocated() / GIB if torch.cuda.is_available() else 0.0
    return dict(seq_len=seq_len, step_tokens=args.step_tokens, pairs=n, seconds_per_step=sum(times[1:]) / args.steps,
                ref_pass_seconds=ref_seconds, static_allocated_gib=static, loss_first=losses[0], **peaks())


@torch.no_grad()
def measure_generation(model, name, weights, batch, prompt_tokens, args, vocab, device, temperature, chunk=None):
    ids = torch.randint(vocab, (batch, prompt_tokens), device=device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=args.top_p) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    mask = torch.ones_like(ids)
    kwargs = dict(use_cache=True, pad_token_id=model.config.eos_token_id, prefill_chunk_size=chunk, **sampling)
    model.generate(ids[:, :8], attention_mask=mask[:, :8], max_new_tokens=2, **kwargs)  # warm-up: kernels, cuBLAS
    reset_peak()
    sync()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                         **kwargs)
    sync()
    seconds = time.perf_counter() - start
    assert out.shape == (batch, prompt_tokens + args.new_tokens), out.shape
    return dict(name=name, weights=weights, batch=batch, prompt_tokens=prompt_tokens, new_tokens=args.new_tokens,
                temperature=temperature, prefill_chunk=chunk, seconds=seconds,
                tokens_per_s=batch * args.new_tokens / seconds, **peaks())


def generation_rows(model, weights, args, vocab, device):
    runs = [("step candidates", args.questions * args.num_candidates, args.prompt_tokens, args.temperature, None),
            ("judge", args.judge_batch, args.judge_prompt_tokens, 0.0, None)]
    if args.prefill_chunk and weights.endswith("+lora"):  # the paper preset's --prefill-chunk: what it costs in speed
        runs.append((CHUNKED_JUDGE, args.judge_batch, args.judge_prompt_tokens, 0.0, args.prefill_chunk))
    for name, batch, prompt_tokens, temperature, chunk in runs:
        row = measure_generation(model, name, weights, batch, prompt_tokens, args, vocab, device, temperature, chunk)
        log(f"  generate {name} ({weights}): {batch} x ({prompt_tokens} + {args.new_tokens}) tokens, "
            f"{row['tokens_per_s']:.0f} new tokens/s, peak {row['peak_reserved_gib']:.1f} GiB reserved")
        yield row


def cpu_copy(p):
    # as a plain tensor: Params4bit.to("cpu") would move the quantization state of the model's own weight
    return p.data.as_subclass(torch.Tensor).detach().to("cpu", copy=True)


def snapshot(model):
    """CPU copies of every LoRA tensor and of the first and last few base tensors (embeddings ... norm, lm_head)."""
    params = dict(model.named_parameters())
    base = [n for n in params if "lora_" not in n]
    return ({n: cpu_copy(p) for n, p in params.items() if "lora_" in n},
            {n: cpu_copy(params[n]) for n in base[:3] + base[-3:]})


def adapter_checks(model, before, dpo_rows):
    lora_before, base_before = before
    params = dict(model.named_parameters())
    lora_changed = bool(lora_before) and all(not torch.equal(v, cpu_copy(params[n])) for n, v in lora_before.items())
    base_unchanged = all(torch.equal(v, cpu_copy(params[n])) for n, v in base_before.items()) and \
        all(not p.requires_grad and p.grad is None for n, p in params.items() if "lora_" not in n)
    starts_log2 = bool(dpo_rows) and all(abs(r["loss_first"] - math.log(2)) < 0.05 for r in dpo_rows)
    return dict(lora_changed=lora_changed, base_unchanged=base_unchanged,
                adapter_trains=lora_changed and base_unchanged, loss_starts_at_log2=starts_log2)


def fits(dpo_rows, gen_rows):
    """
    Per budget: the longest measured sequence length whose Step-DPO peak fits (measured, at the pairs run), the
    pairs per batch that would fit at that length (estimated: activations taken as linear in the batch), and the
    measured generation settings that fit. Nothing is extrapolated beyond the lengths run.
    """
    table = {}
    for budget, usable in BUDGETS_GIB.items():
        ok = [r for r in dpo_rows if r["peak_reserved_gib"] <= usable]
        best = max(ok, key=lambda r: r["seq_len"], default=None)
        entry = dict(usable_gib=usable, step_dpo=None)
        if best is not None:
            per_pair = max(best["peak_reserved_gib"] - best["static_allocated_gib"], 1e-3) / best["pairs"]
            entry["step_dpo"] = dict(seq_len=best["seq_len"], pairs_measured=best["pairs"],
                                     peak_reserved_gib=best["peak_reserved_gib"],
                                     pairs_estimated=int((usable - best["static_allocated_gib"]) // per_pair))
        entry["generation"] = [f"{r['name']} {r['weights']} batch {r['batch']}" for r in gen_rows
                               if r["peak_reserved_gib"] <= usable]
        table[budget] = entry
    return table


def search_tokens(questions, steps, step_tokens, w, judge_tokens, orders):
    """
    New tokens one search iteration generates (paper §3.3): at each of `steps` rounds per question, w candidate steps
    and C(w, 2) judge comparisons in each order. An upper bound: identical candidates are not judged, and roll-backs
    (which add rounds) are rare in the paper's setting. -> (candidate tokens, judge tokens)
    """
    rounds = questions * steps
    return rounds * w * step_tokens, rounds * math.comb(w, 2) * orders * judge_tokens


def iteration_hours(gen_rows, dpo_rows, args, questions):
    """
    Estimated hours of one iteration from measured parts: search tokens over the measured tokens/s of the model as
    the search runs it (4 bit + LoRA, the preset's GEN_ARGS), plus Step-DPO with one pair per step (at most one pair
    per round) at the measured seconds per optimizer step of the longest length run. On one GPU: with N GPUs the
    search shards N ways and DDP splits Step-DPO. None without the rows.
    """
    speed = {r["name"]: r["tokens_per_s"] for r in gen_rows if r["weights"].endswith("+lora")}
    if not dpo_rows or not {"step candidates", "judge"} <= set(speed):
        return None
    speed["judge"] = speed.get(CHUNKED_JUDGE, speed["judge"])  # as the preset runs it, when measured
    cand, judge = search_tokens(questions, PAPER_STEPS, PAPER_STEP_TOKENS, args.num_candidates, args.judge_tokens,
                                args.orders)
    dpo = max(dpo_rows, key=lambda r: r["seq_len"])
    pairs = questions * PAPER_STEPS
    search_s = cand / speed["step candidates"] + judge / speed["judge"]
    dpo_s = pairs / dpo["pairs"] * dpo["seconds_per_step"]
    return dict(questions=questions, candidate_tokens=cand, judge_tokens=judge, search_hours=search_s / 3600,
                step_dpo_pairs=pairs, step_dpo_seq_len=dpo["seq_len"], step_dpo_hours=dpo_s / 3600,
                hours=(search_s + dpo_s) / 3600)


def vllm_rows(size, args, workdir, weights):
    """
    (f) Candidates and judge through the vLLM engine, as the search sends them (see the docstring). Random weights
    never stop early: every sequence writes exactly --new-tokens (ignore_eos, min_tokens).
    """
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    reset_peak()
    start = time.perf_counter()
    settings = vllm_engine.engine_settings()
    if torch.cuda.is_available():
        settings["gpu_memory_utilization"] = 0.8  # this process keeps its CUDA context and cache
    llm = LLM(model=os.path.join(workdir, "base"), load_format="dummy", skip_tokenizer_init=True, enable_lora=True,
              max_lora_rank=max(16, args.lora_rank), **settings)
    engine_start = time.perf_counter() - start
    log(f"{size}: vLLM engine started in {engine_start:.1f} s")
    lora = LoRARequest("adapter", 1, os.path.join(workdir, "adapter"))
    vocab = llm.llm_engine.model_config.hf_config.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    random_ids = lambda n: torch.randint(vocab, (n,), generator=g).tolist()  # noqa: E731
    fixed = dict(max_tokens=args.new_tokens, min_tokens=args.new_tokens, ignore_eos=True, detokenize=False)
    questions = args.vllm_questions
    candidates = [random_ids(args.prompt_tokens) for _ in range(questions)]
    candidates = [p for p in candidates for _ in range(args.num_candidates)]
    comparisons = math.comb(args.num_candidates, 2) * args.orders
    shared = max(1, args.judge_prompt_tokens - 2 * args.step_tokens)
    judge = []
    for _ in range(questions):
        prefix = random_ids(shared)
        judge += [prefix + random_ids(args.judge_prompt_tokens - shared) for _ in range(comparisons)]
    runs = [("step candidates", candidates, [SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=i,
                                                            **fixed) for i in range(len(candidates))]),
            ("judge", judge, SamplingParams(temperature=0.0, **fixed))]
    llm.generate([{"prompt_token_ids": random_ids(8)}], SamplingParams(max_tokens=2), lora_request=lora,
                 use_tqdm=False)  # warm-up
    for name, prompts, params in runs:
        reset_peak()
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=lora, use_tqdm=False)
        seconds = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outs)
        row = dict(name=name, weights=weights + "+lora", engine="vllm", sequences=len(prompts),
                   prompt_tokens=len(prompts[0]), new_tokens=args.new_tokens, seconds=seconds,
                   tokens_per_s=len(prompts) * args.new_tokens / seconds, engine_start_seconds=engine_start)
        if name == "judge":
            row["shared_prefix_tokens"] = shared
        log(f"  vLLM {name} ({row['weights']}): {len(prompts)} x ({row['prompt_tokens']} + {args.new_tokens}) "
            f"tokens, {row['tokens_per_s']:.0f} new tokens/s")
        yield row
    vllm_engine.shutdown(llm)
    del llm
    gc.collect()


def versions():
    import peft
    import transformers
    found = {}
    for name in ["bitsandbytes", "vllm"]:
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = None
    return dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                transformers=transformers.__version__, peft=peft.__version__, **found)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="7b,1.5b", help="comma-separated, of: " + ", ".join(QWEN25_MATH))
    p.add_argument("--seq-lens", help="Step-DPO sequence lengths, prefix + step (default 512,1024,2048)")
    p.add_argument("--step-tokens", type=int, help="tokens in the chosen and in the rejected step (default 128)")
    p.add_argument("--pairs", type=int, default=1, help="Step-DPO pairs per batch (train_step_dpo: --batch-size)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per length, after one warm-up")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (does not change the cost)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the LoRA weights")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA r (alpha = 2r), as the trainers' default")
    p.add_argument("--num-candidates", type=int, default=6, help="w, step candidates per question (paper §4)")
    p.add_argument("--questions", type=int, help="questions per generation batch (default 16)")
    p.add_argument("--prompt-tokens", type=int, help="policy prompt: question + steps so far (default 256)")
    p.add_argument("--temperature", type=float, default=0.5, help="step sampling temperature")
    p.add_argument("--top-p", type=float, default=0.95, help="step sampling top-p")
    p.add_argument("--judge-batch", type=int, help="judge prompts per batch (default 96)")
    p.add_argument("--judge-prompt-tokens", type=int, help="judge prompt length (default 600)")
    p.add_argument("--new-tokens", type=int, help="new tokens per sequence, exactly (default 64)")
    p.add_argument("--prefill-chunk", type=int, help="judge again with this --prefill-chunk (default 256; 0: not)")
    p.add_argument("--vllm-questions", type=int, help="vLLM: questions per search chunk (default 32, the preset's)")
    p.add_argument("--engines", default="hf,vllm", help="vllm is measured only where it is importable")
    p.add_argument("--judge-tokens", type=float, default=300, help="time estimate: judge explanation (assumed)")
    p.add_argument("--orders", type=int, default=2, help="time estimate: judging orders (the paper preset's 2)")
    p.add_argument("--time-budget", type=float, default=420, help="seconds; later measurements are skipped after")
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--tiny", action="store_true", help="CPU: a 2-layer hidden-64 Qwen2, no 4 bit, in seconds")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name, (gpu, tiny) in SHAPES.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else gpu)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    args.seq_lens = [int(s) for s in str(args.seq_lens).split(",")]
    unknown = [s for s in args.sizes if s not in QWEN25_MATH]
    if unknown:
        raise DataError(f"--sizes: unknown {unknown}; known: {list(QWEN25_MATH)}")
    if args.steps < 1 or args.pairs < 1:
        raise DataError("--steps and --pairs must be at least 1")
    if min(args.seq_lens) <= args.step_tokens:
        raise DataError(f"--seq-lens {args.seq_lens}: each must be longer than --step-tokens {args.step_tokens}")
    return args


def main(argv=None):
    global T0
    T0 = time.perf_counter()
    args = parse_args(argv)
    if not args.tiny:
        if not torch.cuda.is_available():
            raise DataError("gpu_check.py needs a CUDA GPU (4-bit QLoRA via bitsandbytes); on CPU add --tiny")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise DataError("bitsandbytes is not importable: bash scripts/fetch_gpu_wheels.sh here, then on "
                                   "the GPU machine pip install --target /tmp/site .whl/*.whl, PYTHONPATH=/tmp/site")
    device, dtype = modeling.device_and_dtype()
    threads = torch.get_num_threads()
    if args.tiny:
        torch.set_num_threads(1)  # tiny matrices gain nothing from threads, and a shared CPU makes them spin
    try:
        return run(args, device, dtype)
    finally:
        torch.set_num_threads(threads)


def run(args, device, dtype):
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU, --tiny)",
                  gpu_total_gib=torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available()
                  else 0.0, versions=versions(), args=vars(args), models={})
    save = lambda: write_json(args.out, result)  # noqa: E731
    log(f"gpu check on {result['gpu']}, {result['versions']}")
    with_vllm = "vllm" in args.engines and importlib.util.find_spec("vllm") is not None
    if "vllm" in args.engines and not with_vllm:
        log("vllm is not importable: the vLLM engine is not measured (pip install -r requirements-vllm.txt)")
    for size in args.sizes:
        if time.perf_counter() - T0 > args.time_budget:
            log(f"{size}: skipped, past --time-budget {args.time_budget:.0f} s")
            result["models"][size] = dict(skipped="time budget")
            continue
        result["models"][size] = r = {}
        with tempfile.TemporaryDirectory() as workdir:
            check_model(size, r, args, device, dtype, save, workdir if with_vllm else None)
            reset_peak()
            if with_vllm and time.perf_counter() - T0 <= args.time_budget:
                r["vllm"] = list(vllm_rows(size, args, workdir, str(dtype).replace("torch.", "")))
                r["iteration_estimate_vllm"] = [iteration_hours(r["vllm"], r["step_dpo"], args, q)
                                                for q in (400, 800, 1200)]
                save()
                for est in filter(None, r["iteration_estimate_vllm"]):
                    log(f"{size}, {est['questions']} questions, vLLM: ~{est['hours']:.1f} h per iteration on one GPU "
                        f"(estimated: search {est['search_hours']:.1f} h, Step-DPO {est['step_dpo_hours']:.1f} h)")
            elif with_vllm:
                log(f"{size}: vLLM skipped, past --time-budget")
    checks = [r["checks"] for r in result["models"].values() if "checks" in r]
    result["checks_passed"] = bool(checks) and all(c["adapter_trains"] and c["loss_starts_at_log2"] for c in checks)
    result["total_seconds"] = time.perf_counter() - T0
    save()
    log(f"wrote {args.out}: checks {'passed' if result['checks_passed'] else 'FAILED'}, "
        f"{result['total_seconds']:.0f} s in all")
    return result


def check_model(size, r, args, device, dtype, save, workdir=None):
    """
    One size, filling r: generate in bf16, quantize to NF4, put LoRA on, Step-DPO per length, generate again.
    workdir: where the vLLM measurement's inputs go (the config, the trained adapter); None: not written.
    """
    torch.manual_seed(args.seed)
    weights = str(dtype).replace("torch.", "")  # bfloat16 on GPU, float32 on CPU (--tiny)
    start = time.perf_counter()
    model = build_model(size, args.tiny, device, dtype)
    vocab = model.config.vocab_size
    r.update(config=json.loads(model.config.to_json_string()), build_seconds=time.perf_counter() - start,
             parameters=sum(p.numel() for p in model.parameters()), generation=[], step_dpo=[])
    log(f"{size}: built {r['parameters'] / 1e9:.2f}B parameters in {r['build_seconds']:.1f} s")
    for row in generation_rows(model, weights, args, vocab, device):
        r["generation"].append(row)
        save()
    if not args.tiny:
        start = time.perf_counter()
        model, weights = quantize_nf4_in_place(model), "nf4"
        r["quantize_seconds"] = time.perf_counter() - start
        log(f"{size}: quantized to NF4 in {r['quantize_seconds']:.1f} s, "
            f"{torch.cuda.memory_allocated() / GIB:.1f} GiB allocated")
    model, train_args = prepare_lora(model, args, load_in_4bit=not args.tiny)
    optimizer = modeling.make_optimizer(model, train_args, lr=args.lr)
    before = snapshot(model)
    for seq_len in args.seq_lens:
        if time.perf_counter() - T0 > args.time_budget:
            log(f"{size}: Step-DPO at {seq_len} skipped, past --time-budget")
            continue
        row = measure_step_dpo(model, optimizer, seq_len, args, vocab, device)
        r["step_dpo"].append(row)
        save()
        log(f"  Step-DPO {size} {weights}+LoRA, {args.pairs} pair(s) of {seq_len} tokens: "
            f"{row['seconds_per_step']:.2f} s/step, peak {row['peak_allocated_gib']:.1f} GiB allocated / "
            f"{row['peak_reserved_gib']:.1f} reserved, first loss {row['loss_first']:.4f}")
    r["checks"] = adapter_checks(model, before, r["step_dpo"])
    log(f"{size}: checks {r['checks']}")
    del optimizer, before
    model.eval()
    r["generation"] += list(generation_rows(model, weights + "+lora", args, vocab, device))
    if workdir:
        model.config.save_pretrained(os.path.join(workdir, "base"))
        model.save_pretrained(os.path.join(workdir, "adapter"))  # PEFT: the adapter only
    r["fits"] = fits(r["step_dpo"], r["generation"])
    r["iteration_estimate"] = [iteration_hours(r["generation"], r["step_dpo"], args, q) for q in (400, 800, 1200)]
    save()
    for budget, entry in r["fits"].items():
        dpo = entry["step_dpo"] or {}
        log(f"{size} in {budget}: Step-DPO at {dpo.get('seq_len', 'no measured')} tokens "
            f"(~{dpo.get('pairs_estimated', 0)} pairs, estimated); generation: {entry['generation']}")
    for est in filter(None, r["iteration_estimate"]):
        log(f"{size}, {est['questions']} questions: ~{est['hours']:.1f} h per iteration on one GPU (estimated: search "
            f"{est['search_hours']:.1f} h, Step-DPO {est['step_dpo_hours']:.1f} h)")


if __name__ == "__main__":
    cli(lambda: sys.exit(0 if main()["checks_passed"] else 1))
