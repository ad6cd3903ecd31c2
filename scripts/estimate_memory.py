"""
GPU memory of the paper's setup under QLoRA, estimated on a CPU in minutes: no GPU, no weights, no download.

Step-DPO: the training step of train_step_dpo.py (chosen and rejected rows of one micro-batch in one pass, logits
only over the step, sequence_logps, step_dpo_loss (Eqs. 6-8), backward through gradient-checkpointed layers,
gradient clipping, AdamW on the LoRA weights). SFT: train_sft.py's step likewise (masked_nll, logits over every
position). Generation: the prefill of one HF generate call as modeling.generate makes it (step candidates, judge
prompts, evaluation), then the keys and values each new token adds.
All run on the Qwen2.5-Math-7B/-1.5B configurations (gpu_check.QWEN25_MATH) on PyTorch's "meta" device, where
tensors have shapes and dtypes but no data. A dispatch mode (LiveBytes) sees every tensor each op makes and adds up
the bytes of the storages alive at each moment; the peak of that sum is what torch.cuda.max_memory_allocated reports
on a GPU for the same tensors. tests/test_estimate_memory.py checks the count against glibc's own on real tensors.

Where a GPU run differs, and what is done about it:
  - 4-bit weights: bitsandbytes cannot run on "meta". Each frozen linear layer is a stand-in (Linear4bitStandIn)
    whose weight is counted at NF4's size (nf4_bytes) and which, like bitsandbytes' MatMul4Bit, makes a bf16 copy of
    its weight for each matmul (forward, and backward for the input's gradient) and frees it after; like PEFT's
    4-bit LoRA layer it clones the base output. Embeddings and lm_head stay bf16, as from_pretrained leaves them.
    (For small matmuls, under ~1,500 rows on some GPUs, bitsandbytes runs a fused kernel without the copy.)
  - attention: on "meta", SDPA falls back to the math path, which keeps the T x T attention weights; a GPU runs a
    fused kernel that keeps only the output and the log-sum-exp. The estimate calls that kernel's meta version
    (aten._scaled_dot_product_efficient_attention, what SDPA picks on CUDA with a padding mask).
  - rows are full length, without padding (a micro-batch's worst case), so there is no padding mask: a padded
    batch adds a [B, 1, T, T] boolean mask (64 MiB for 16 rows of 2,048 tokens).
  - not counted: the CUDA context (~0.5 GiB, outside PyTorch's allocator; gpu_check.BUDGETS_GIB leaves room for
    it), the caching allocator's rounding and fragmentation (reserved minus allocated: --headroom, assumed 10 %, in
    the fit tables), cuBLAS workspaces.
So the figures are an estimate from the real code path's tensors, not a GPU measurement: gpu_check.py measures
(peak_allocated_gib next to peak_reserved_gib) when a GPU is at hand, and its rows can be set beside these.

Writes --out (JSON): per model size, SFT rows (peak per length and rows per micro-batch); Step-DPO rows (weights,
static = weights + LoRA + AdamW state, peak) per length and pairs per micro-batch, with and without gradient
checkpointing; generation rows (prefill peak, peak) per shape and batch; the largest settings that fit 24/40/80 GB.

    python -m scripts.estimate_memory --out scripts/estimate_memory.json      # ~10 min on 2 CPU cores
    python -m scripts.estimate_memory --compare gpu_check.json                # after a GPU run: estimate vs measured
"""

import argparse
import datetime
import json
import os
import platform
import re
import time
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

import modeling
from common import DataError, cli, write_json
from scripts import gpu_check
from train_sft import masked_nll
from train_step_dpo import sequence_logps, step_dpo_loss

GIB = 2 ** 30


class LiveBytes(TorchDispatchMode):
    """
    Bytes of the tensor storages alive now (.now) and at most so far (.peak), counting every tensor an op returns
    while the mode is on, plus those handed to add() (parameters made before it). A storage is counted once, however
    many views share it, until it is freed. counted_as lets a tensor stand for another size (an NF4 weight).
    """

    def __init__(self):
        super().__init__()
        self.live = WeakIdKeyDictionary()
        self.now = self.peak = 0
        self.counted_as = WeakIdKeyDictionary()

    def add(self, t):
        storage = t.untyped_storage()
        if storage in self.live:
            return
        nbytes = self.counted_as.get(t, storage.nbytes())
        self.live[storage] = nbytes
        self.now += nbytes
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, nbytes)

    def _free(self, nbytes):
        self.now -= nbytes

    def reset_peak(self):
        self.peak = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.add, out)
        return out


def nf4_bytes(numel, blocksize=64, double_quant=True):
    """
    Bytes bitsandbytes keeps for one NF4 weight (Dettmers et al. 2023): 4 bits per value, one absmax per block of 64;
    with double quantization the absmaxes are 8-bit in blocks of 256, each block with an fp32 scale, plus a 256-entry
    fp32 code and an fp32 offset. 7B's gate_proj (3584 x 18944): 33.95 MB + 1.06 MB + 16.6 kB + 1 kB.
    """
    blocks = -(-numel // blocksize)
    if not double_quant:
        return numel // 2 + 4 * blocks
    return numel // 2 + blocks + 4 * -(-blocks // 256) + 4 * 256 + 4


class _MatMul4bit(torch.autograd.Function):
    """bitsandbytes' MatMul4Bit, in memory: dequantize for the matmul, keep only the packed weight for backward."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight
        return x @ weight.clone().t()  # the clone is the dequantized bf16 weight, freed after the matmul

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.weight.clone(), None  # dequantized again; the frozen weight gets no gradient


class Linear4bitStandIn(torch.nn.Linear):
    """A frozen linear layer with bitsandbytes' Linear4bit memory behaviour; PEFT wraps it like any nn.Linear."""

    def forward(self, x):
        out = _MatMul4bit.apply(x, self.weight)
        if self.bias is not None:
            out = out + self.bias
        return out.clone()  # PEFT's 4-bit LoRA layer clones the base output ("defensively", peft/tuners/lora/bnb.py)


def fused_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """
    Causal attention as a GPU runs it (a fused kernel: output and log-sum-exp kept, never the T x T weights).
    Registered as attn_implementation "fused_estimate"; off "meta" (the CPU tests) it is plain SDPA.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    if query.device.type == "meta":
        out = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, True, 0.0, True,
                                                                      scale=scaling)[0]
    else:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def build(size, device, four_bit, lora_rank, checkpointing, config, dtype):
    """
    gpu_check's Qwen2 from the exact config (with `config` overrides: the tests' small shapes), its frozen linears
    as 4-bit stand-ins, LoRA as the trainers set it. four_bit="bitsandbytes" quantizes with bitsandbytes itself
    instead (real tensors only; its CPU backend lets the tests check the stand-in against it).
    """
    from transformers import AttentionInterface
    AttentionInterface.register("fused_estimate", fused_attention)
    model = gpu_check.build_model(size, False, device, dtype, attn="fused_estimate", **(config or {}))
    if four_bit == "bitsandbytes":
        model = gpu_check.quantize_nf4_in_place(model)
    elif four_bit:
        for name, m in list(model.named_modules()):
            if type(m) is torch.nn.Linear and not name.endswith("lm_head"):
                new = Linear4bitStandIn(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
                new.weight, new.bias = m.weight, m.bias
                model.set_submodule(name, new)
    model, train_args = gpu_check.prepare_lora(model, argparse.Namespace(lora_rank=lora_rank), load_in_4bit=False,
                                               checkpointing=checkpointing)
    return model, modeling.make_optimizer(model, train_args, lr=1e-4)


def count_weights(model):
    """
    A LiveBytes holding the model's parameters and buffers: 4-bit stand-ins at NF4's size, bitsandbytes' packed
    weights with their quantization state (absmax, code, offset).
    """
    mem = LiveBytes()
    for w in [m.weight for m in model.modules() if isinstance(m, Linear4bitStandIn)]:
        mem.counted_as[w] = nf4_bytes(w.numel())
    for t in list(model.parameters()) + list(model.buffers()):
        mem.add(t)
    for state in [p.quant_state for p in model.parameters() if getattr(p, "quant_state", None) is not None]:
        for t in (state.absmax, state.code, state.offset, *((state.state2.absmax, state.state2.code)
                                                              if state.nested else ())):
            if isinstance(t, torch.Tensor):
                mem.add(t)
    return mem


def count_training_step(model, optimizer, mem, make_loss):
    """
    Peak and static bytes of one optimizer step as the trainers take it, the second one, so AdamW's state exists.
    make_loss() runs under the counter (inputs, Step-DPO's reference pass) and returns a closure giving the loss.
    """
    with mem:
        loss_fn = make_loss()
        for step in range(2):
            if step == 1:  # the counted step; as in the trainers, step 0's graph lives until `loss` is reassigned
                mem.reset_peak()
            loss = loss_fn()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        del loss
        return mem.now, mem.peak  # static: what stays between steps (weights, LoRA, AdamW state, the inputs)


def forward_logits(model, ids, keep):
    # the padding mask is left out: building it reads data (.all()), which "meta" tensors do not have
    return model(input_ids=ids, attention_mask={"full_attention": None}, use_cache=False, logits_to_keep=keep).logits


def estimate_step_dpo(size, seq_len, pairs, step_tokens, four_bit=True, checkpointing=True, lora_rank=16,
                      device="meta", config=None, dtype=torch.bfloat16):
    """
    Peak bytes of a Step-DPO optimizer step as train_step_dpo runs it: 2 x pairs rows of seq_len tokens (prefix +
    step), chosen and rejected in one pass, logits over the last step_tokens + 1 positions only, the reference
    log-probs from a no-grad pass before. Every row is full length (no padding): a micro-batch's worst case.
    The tests run small configs on real CPU tensors in float32 (bf16 matmuls are slow on CPUs). -> dict of GiB
    """
    model, optimizer = build(size, torch.device(device), four_bit, lora_rank, checkpointing, config, dtype)
    mem = count_weights(model)
    weights = mem.now

    def make_loss():
        ids = torch.randint(model.config.vocab_size, (2 * pairs, seq_len), device=device)
        step_mask = torch.ones(2 * pairs, step_tokens, device=device)

        def policy_logps():
            logits = forward_logits(model, ids, step_tokens + 1)
            return sequence_logps(logits[:, :-1], ids[:, -step_tokens:], step_mask)

        with torch.no_grad():
            ref = policy_logps()

        def loss():
            logps = policy_logps()
            return step_dpo_loss(logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], beta=0.1)[0].mean()
        return loss

    static, peak = count_training_step(model, optimizer, mem, make_loss)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(size=size, seq_len=seq_len, pairs=pairs, step_tokens=step_tokens, four_bit=four_bit,
                gradient_checkpointing=checkpointing, lora_parameters=lora, weights_gib=weights / GIB,
                static_gib=static / GIB, peak_gib=peak / GIB)


def estimate_sft(size, seq_len, batch, four_bit=True, checkpointing=True, lora_rank=16, device="meta", config=None,
                 dtype=torch.bfloat16):
    """
    Peak bytes of an SFT optimizer step as train_sft runs it (M0 -> M1): `batch` rows of seq_len tokens, logits
    over every position (the loss mask is applied after the cross-entropy, train_sft.masked_nll). -> dict of GiB
    """
    model, optimizer = build(size, torch.device(device), four_bit, lora_rank, checkpointing, config, dtype)
    mem = count_weights(model)
    weights = mem.now

    def make_loss():
        ids = torch.randint(model.config.vocab_size, (batch, seq_len), device=device)
        mask = torch.ones(batch, seq_len, device=device)
        return lambda: masked_nll(forward_logits(model, ids, 0), ids, mask)

    static, peak = count_training_step(model, optimizer, mem, make_loss)
    return dict(size=size, seq_len=seq_len, batch=batch, four_bit=four_bit, gradient_checkpointing=checkpointing,
                weights_gib=weights / GIB, static_gib=static / GIB, peak_gib=peak / GIB)


def kv_cache_bytes(config, tokens, dtype_bytes=2):
    """Keys and values of every layer for `tokens` tokens: 2 x layers x key/value heads x head_dim x bytes each."""
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype_bytes * tokens


@torch.no_grad()
def estimate_generation(size, batch, prompt_tokens, new_tokens, prefill_chunk=0, four_bit=True, device="meta",
                        config=None, dtype=torch.bfloat16):
    """
    Peak bytes of one HF generate call as modeling.generate makes it (M_t: 4-bit + LoRA, `batch` left-padded prompts
    of prompt_tokens, up to new_tokens each). The prefill, a forward over batch x prompt_tokens (or, with
    prefill_chunk, one per chunk of that many tokens, as --prefill-chunk makes generate do) with logits for the last
    position only (generate's logits_to_keep=1), is run and counted; each decoding step then adds one token's keys
    and values per sequence (kv_cache_bytes; a one-token forward's activations are small). -> dict of GiB
    """
    model, _ = build(size, torch.device(device), four_bit, lora_rank=16, checkpointing=False, config=config,
                     dtype=dtype)
    model.eval()
    mem = count_weights(model)
    weights = mem.now
    ids = torch.zeros(batch, prompt_tokens, dtype=torch.long, device=device)
    with mem:
        mem.add(ids)
        cache = None
        for chunk in ids.split(prefill_chunk or prompt_tokens, dim=1):
            # past_key_values: the name transformers 5.17 knows (5.24 calls it `cache` and warns)
            out = model(input_ids=chunk, attention_mask={"full_attention": None}, past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
        after_prefill = mem.now
    decoded = after_prefill + kv_cache_bytes(model.config, batch * new_tokens, torch.finfo(dtype).bits // 8)
    del out, cache
    return dict(size=size, batch=batch, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                prefill_chunk=prefill_chunk, four_bit=four_bit, weights_gib=weights / GIB,
                prefill_peak_gib=mem.peak / GIB, cache_after_prefill_gib=(after_prefill - weights) / GIB,
                peak_gib=max(mem.peak, decoded) / GIB)


def fit_table(rows, budgets, headroom, count="pairs"):
    """
    Per card: the longest length, then the largest micro-batch (`count`: Step-DPO pairs, SFT rows), with gradient
    checkpointing, whose peak x (1 + headroom) fits.
    """
    table = {}
    for card, usable in budgets.items():
        ok = [r for r in rows if r["gradient_checkpointing"] and r["peak_gib"] * (1 + headroom) <= usable]
        best = max(ok, key=lambda r: (r["seq_len"], r[count]), default=None)
        table[card] = None if best is None else {"seq_len": best["seq_len"], count: best[count],
                                                 "peak_gib": round(best["peak_gib"], 2), "usable_gib": usable}
    return table


def generation_fit_table(rows, budgets, headroom):
    """Per card and generation shape: the largest batch whose peak x (1 + headroom) fits (None: not even the least)."""
    table = {}
    for card, usable in budgets.items():
        table[card] = {}
        for name in dict.fromkeys(r["name"] for r in rows):
            ok = [r for r in rows if r["name"] == name and r["peak_gib"] * (1 + headroom) <= usable]
            table[card][name] = max((r["batch"] for r in ok), default=None)
    return table


def read_json(path, key):
    """A JSON file written by this script or gpu_check.py (`key` is one of its fields), or a one-line error."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{path}: no {key!r} field; is it the right file?")
    return obj


def compare(estimate, measured):
    """
    gpu_check.py's measured Step-DPO rows beside this script's estimate of the same (size, length, pairs, step
    tokens): how far the estimate is from torch.cuda.max_memory_allocated, and what the allocator reserved on top.
    """
    rows = []
    for size, model in measured["models"].items():
        for m in model.get("step_dpo", []):
            match = [r for r in estimate["step_dpo"] if r["size"] == size and r["gradient_checkpointing"] and
                     (r["seq_len"], r["pairs"], r["step_tokens"]) == (m["seq_len"], m["pairs"], m["step_tokens"])]
            if match:
                est = match[0]["peak_gib"]
                rows.append(dict(size=size, seq_len=m["seq_len"], pairs=m["pairs"], estimated_gib=est,
                                 allocated_gib=m["peak_allocated_gib"], reserved_gib=m["peak_reserved_gib"],
                                 estimate_over_allocated=est / m["peak_allocated_gib"]))
    return rows


def int_list(text):
    """argparse type: "512,1024" -> [512, 1024]."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want comma-separated integers") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="7b,1.5b", help="comma-separated, of: " + ", ".join(gpu_check.QWEN25_MATH))
    p.add_argument("--seq-lens", default="512,1024,2048", type=int_list,
                   help="Step-DPO: prefix + step tokens per row")
    p.add_argument("--pairs", default="1,2,4,8", type=int_list,
                   help="Step-DPO: pairs per micro-batch (train_step_dpo --batch-size)")
    p.add_argument("--step-tokens", type=int, default=128, help="Step-DPO: tokens of each step (chosen, rejected)")
    p.add_argument("--sft-seq-lens", default="1024,2048", type=int_list,
                   help="SFT: tokens per row (presets/paper.sh: --max-len 2048)")
    p.add_argument("--sft-batches", default="1,2,4", type=int_list,
                   help="SFT: rows per micro-batch (train_sft --batch-size)")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA r (alpha = 2r), as the trainers' default")
    # prompt and new-token lengths of presets/paper.sh's generation calls: the policy's prompt (question + steps so
    # far) and --max-step-tokens 512; the judge's prompt (Fig. 5 + question + steps + two candidates) and
    # --judge-max-new-tokens 1024; evaluation's question and --max-new-tokens 2048. Prompt lengths are assumed.
    p.add_argument("--gen-shapes", default="candidates:1024:512,judge:1536:1024,evaluation:256:2048,"
                   "candidates:1024:512:256,judge:1536:1024:256",
                   help="generation: name:prompt_tokens:new_tokens[:prefill_chunk], comma-separated")
    p.add_argument("--gen-batches", default="8,16,32,64,128", type=int_list,
                   help="generation: sequences per generate call (--batch-size)")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="fit tables: allocator rounding and fragmentation, as a fraction of the peak (assumed)")
    p.add_argument("--out", default="scripts/estimate_memory.json")
    p.add_argument("--compare", metavar="GPU_CHECK_JSON",
                   help="estimate nothing: print gpu_check.py's measured Step-DPO peaks beside those in --out")
    args = p.parse_args(argv)
    if args.compare:
        rows = compare(read_json(args.out, "step_dpo"), read_json(args.compare, "models"))
        for r in rows:
            print(f"{r['size']} Step-DPO {r['pairs']} pair(s) x {r['seq_len']}: estimated {r['estimated_gib']:.2f} GiB,"
                  f" measured {r['allocated_gib']:.2f} allocated / {r['reserved_gib']:.2f} reserved "
                  f"(estimate / allocated = {r['estimate_over_allocated']:.2f})")
        return rows
    sizes = args.sizes.split(",")
    if not set(sizes) <= set(gpu_check.QWEN25_MATH):
        raise DataError(f"--sizes {args.sizes}: known sizes are {', '.join(gpu_check.QWEN25_MATH)}")
    if not all(re.fullmatch(r"\w+:\d+:\d+(:\d+)?", shape) for shape in args.gen_shapes.split(",")):
        raise DataError(f"--gen-shapes {args.gen_shapes}: want name:prompt_tokens:new_tokens[:prefill_chunk]")
    start, dpo, sft, gen = time.perf_counter(), [], [], []
    for size in sizes:
        for seq_len in args.sft_seq_lens:
            for batch in args.sft_batches:
                sft.append(estimate_sft(size, seq_len, batch, lora_rank=args.lora_rank))
                print(f"{size} QLoRA SFT, {batch} x {seq_len} tokens: peak {sft[-1]['peak_gib']:.2f} GiB", flush=True)
        for seq_len in args.seq_lens:
            for pairs in args.pairs:
                dpo.append(estimate_step_dpo(size, seq_len, pairs, args.step_tokens, lora_rank=args.lora_rank))
                r = dpo[-1]
                print(f"{size} QLoRA Step-DPO, {pairs} pair(s) x {seq_len} tokens: weights {r['weights_gib']:.2f} "
                      f"GiB, static {r['static_gib']:.2f}, peak {r['peak_gib']:.2f} GiB", flush=True)
        for seq_len in args.seq_lens:  # what gradient checkpointing saves, at the smallest micro-batch
            dpo.append(estimate_step_dpo(size, seq_len, 1, args.step_tokens, checkpointing=False,
                                         lora_rank=args.lora_rank))
            print(f"{size} without gradient checkpointing, 1 pair x {seq_len}: peak {dpo[-1]['peak_gib']:.2f} GiB")
        for shape in args.gen_shapes.split(","):
            name, prompt_tokens, new_tokens, chunk = (shape.split(":") + ["0"])[:4]
            name += f", prefill chunks of {chunk}" if int(chunk) else ""
            for batch in args.gen_batches:
                gen.append(dict(name=name, **estimate_generation(size, batch, int(prompt_tokens), int(new_tokens),
                                                                 int(chunk))))
                r = gen[-1]
                print(f"{size} 4-bit+LoRA generate, {name}: {batch} x ({prompt_tokens} + {new_tokens}) tokens: "
                      f"prefill peak {r['prefill_peak_gib']:.2f} GiB, peak {r['peak_gib']:.2f} GiB", flush=True)
    fits = {size: dict(sft=fit_table([r for r in sft if r["size"] == size], gpu_check.BUDGETS_GIB, args.headroom,
                                     count="batch"),
                       step_dpo=fit_table([r for r in dpo if r["size"] == size], gpu_check.BUDGETS_GIB,
                                          args.headroom),
                       generation=generation_fit_table([r for r in gen if r["size"] == size], gpu_check.BUDGETS_GIB,
                                                       args.headroom))
            for size in sizes}
    for size, table in fits.items():
        print(f"{size} fits (peak x {1 + args.headroom:g}): {table}")
    import peft
    import transformers
    result = dict(what="estimate (meta-device tensor accounting of the real code path; not a GPU measurement)",
                  date=datetime.date.today().isoformat(), machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
                  versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                                peft=peft.__version__),
                  args=vars(args), sft=sft, step_dpo=dpo, generation=gen, fits=fits,
                  seconds=time.perf_counter() - start)
    write_json(args.out, result)
    print(f"wrote {args.out} in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    cli(main)
