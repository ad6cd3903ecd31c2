"""
The model side that the stages share (torch; the torch-free side is common.py):

- loading exactly as for a hub model (AutoModelForCausalLM / AutoTokenizer), with the optional 4-bit (QLoRA),
  flash-attention and LoRA-adapter paths imported only when asked for;
- batched generation with a stopping rule at the next step marker, and the model judge built on it;
- what both trainers need: LoRA setup, optimizer, learning-rate schedule, DDP, padding, and the optimizer loop.
"""

import contextlib
import hashlib
import json
import os
import time

import torch
from tqdm import tqdm

from common import (NEXT_STEP, VERDICT, DataError, chat_prompt, cut_at_next_step, dir_files, judge_context,
                    oracle_verdicts, parse_verdict, random_verdicts, remove, save_config, write_jsonl, write_manifest)

# ----------------------------------------------------------------------------------------------------------------
# loading and saving


def device_and_dtype():
    """
    fp32 on CPU (this CPU has no fast bf16: bf16 training measured ~30x slower than fp32), bf16 on GPU unless
    TORCH_DTYPE=float32 (iterate.sh's tiny preset sets it: the embedded default was tuned in fp32, and its tiny model
    learns from scratch). Shard i of iterate.sh (LOCAL_RANK=i) takes GPU i, modulo the GPUs there are: the tiny
    preset's two shards share one GPU.
    """
    if torch.cuda.is_available():
        dtype = {"": torch.bfloat16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(
            os.environ.get("TORCH_DTYPE", ""))
        if dtype is None:
            raise DataError(f"TORCH_DTYPE={os.environ['TORCH_DTYPE']!r}: bfloat16 or float32 (empty: bfloat16)")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()), dtype
    return torch.device("cpu"), torch.float32


def _require(module, flag, what):
    try:
        __import__(module)
    except ImportError:
        raise DataError(f"{flag} needs {what}: pip install -r requirements-gpu.txt") from None


def bnb_4bit_config():
    """QLoRA's quantization (Dettmers et al. 2023): NF4 weights, double quantization, bf16 compute."""
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_tokenizer(path):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise DataError(f"cannot load tokenizer {path!r}: it is not a local model directory and the hub is not "
                        f"reachable from here (it needs hub access or a local path) [{str(e).splitlines()[0]}]")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # e.g. Llama; Qwen already has pad = <|endoftext|> = its base EOS
    return tok


def load_model(path, load_in_4bit=False, attn="sdpa", trainable=False, prefill_chunk=0, engine="hf"):
    """
    A causal LM and its tokenizer, loaded as from the hub. If `path` holds a LoRA adapter (adapter_config.json),
    its base model is loaded first (in 4 bit if asked) and the adapter put on top: that is M_t under (Q)LoRA.
    prefill_chunk > 0: HF generate's chunked prefill (the prompt's forward pass N tokens at a time).
    engine="vllm": the same model served by vLLM (vllm_engine.py), for generate() and judge_pairs() only.
    """
    if engine == "vllm":
        import vllm_engine
        return vllm_engine.load_model(path, load_in_4bit=load_in_4bit)
    from transformers import AutoModelForCausalLM
    device, dtype = device_and_dtype()
    adapter = path if os.path.exists(os.path.join(path, "adapter_config.json")) else None
    base = json.load(open(os.path.join(path, "adapter_config.json")))["base_model_name_or_path"] if adapter else path
    kwargs = dict(dtype=dtype, attn_implementation=attn)
    if attn == "flash_attention_2":
        _require("flash_attn", "--attn flash_attention_2", "flash-attn on a CUDA machine")
    if load_in_4bit:
        if not torch.cuda.is_available():
            raise DataError("--load-in-4bit needs a CUDA GPU (bitsandbytes 4-bit); on CPU drop the flag")
        _require("bitsandbytes", "--load-in-4bit", "bitsandbytes")
        kwargs.update(quantization_config=bnb_4bit_config(), device_map={"": device})
    try:
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    except OSError as e:
        raise DataError(f"cannot load model {base!r}: it is not a local model directory and the hub is not "
                        f"reachable from here (it needs hub access or a local path) [{str(e).splitlines()[0]}]")
    if not load_in_4bit:
        model.to(device)
    if adapter:
        from peft import PeftModel
        try:
            model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
        except (RuntimeError, ValueError, KeyError) as e:
            raise DataError(f"adapter {adapter!r} does not fit base model {base!r}: {str(e).splitlines()[0]}")
    tokenizer = load_tokenizer(adapter or path)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if prefill_chunk:
        model.generation_config.prefill_chunk_size = prefill_chunk
    return model, tokenizer


def save_model(model, tokenizer, out_dir, manifest=None, also=None):
    """
    Full model or LoRA adapter (PEFT saves only the adapter), plus the tokenizer so the dir loads on its own. All is
    written to <out_dir>.tmp -- the files `also(folder)` adds, then the manifest (stage, inputs, flags, and the
    fingerprints of the files written) last -- and the folder renamed into place: a half-written model never
    looks finished.
    """
    model = getattr(model, "module", model)  # unwrap DDP
    tmp = out_dir.rstrip("/") + ".tmp"
    remove(tmp)  # left by a killed run
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if also is not None:
        also(tmp)
    if manifest is not None:
        write_manifest(tmp, dict(manifest, files=dir_files(tmp)))
    remove(out_dir)
    os.replace(tmp, out_dir)


def save_trained(model, tokenizer, out_dir, log, args, config_name, manifest):
    """A trainer's outputs, in one folder renamed into place: the model, train_log.jsonl, its config, its manifest."""
    def logs(folder):
        write_jsonl(os.path.join(folder, "train_log.jsonl"), log)
        save_config(args, os.path.join(folder, config_name))
    save_model(model, tokenizer, out_dir, manifest, logs)


# ----------------------------------------------------------------------------------------------------------------
# batched generation


class StopAtNextStep:
    """
    Stop a sequence once its generated text contains the next step marker (custom step splitting).
    Called after every new token, it decodes only the last `window` tokens: the marker is completed by the newest
    token, so it lies among them (decoding the whole continuation each time is quadratic in its length). A marker
    at the very start of the continuation does not count (as in cut_at_next_step). HF generate keeps a sequence
    stopped once this fires, so it need not keep firing after the marker leaves the window.
    stopped_at[row]: the index (among the new tokens) of the token that completed the marker, None if it never
    did; what HF generate appends to that row afterwards is padding, which may be the EOS id (pad = EOS in
    Qwen2.5's base models and SmolLM2), so it must not be read as an EOS the model emitted.
    """

    def __init__(self, tokenizer, prompt_len, window=16):
        self.tokenizer, self.prompt_len, self.window = tokenizer, prompt_len, window
        self.stopped_at = None

    def __call__(self, input_ids, scores, **kwargs):
        start = max(self.prompt_len, input_ids.shape[1] - self.window)
        texts = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
        skip = 1 if start == self.prompt_len else 0
        hits = [self.found(t, skip) for t in texts]
        if self.stopped_at is None:
            self.stopped_at = [None] * len(hits)
        newest = input_ids.shape[1] - self.prompt_len - 1
        self.stopped_at = [newest if hit and at is None else at for hit, at in zip(hits, self.stopped_at)]
        return torch.tensor(hits, device=input_ids.device)

    def found(self, text, skip):
        return text.find(NEXT_STEP, skip) >= 0


class StopAtVerdict(StopAtNextStep):
    """
    --stop-at-verdict: stop a judge's sequence once its text holds a verdict, "[[A]]" or "[[B]]" (common.VERDICT),
    found and recorded (stopped_at) as StopAtNextStep finds its marker; one at the very start counts. The
    explanation after the verdict is not written.
    """

    def found(self, text, skip):
        return VERDICT.search(text) is not None


class SeededGumbel:
    """
    Per-row seeded sampling, for HF generate in greedy mode after its temperature and top-p warpers: adds Gumbel
    noise to the warped logits, and argmax(log p + Gumbel noise) is an exact sample of p (the Gumbel-max trick).
    Row r's noise at its t-th new token comes from a generator seeded by (seeds[r], t) alone, so a row samples the
    same tokens whatever else is in its batch (HF's do_sample draws every row from one global generator).
    """

    def __init__(self, seeds, prompt_len):
        self.seeds, self.prompt_len = seeds, prompt_len

    def __call__(self, input_ids, scores):
        t = input_ids.shape[1] - self.prompt_len  # new tokens so far: the same in every row (left padding)
        generator = torch.Generator(device=scores.device)
        uniform = torch.stack([
            torch.rand(scores.shape[1], generator=generator.manual_seed(row_seed(seed, t)), device=scores.device)
            for seed in self.seeds])
        return scores + -torch.log(-torch.log(uniform.to(scores.dtype)))  # u = 0 -> -inf: that token is never drawn


def row_seed(seed, t):
    """One 63-bit generator seed per (row seed, position), from a hash: no two pairs share a stream."""
    return int.from_bytes(hashlib.blake2b(f"{seed}-{t}".encode(), digest_size=8).digest(), "little") >> 1


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens, temperature=0.0, top_p=1.0, batch_size=64,
             one_step=False, progress=None, seeds=None, stop_at_verdict=False):
    """
    Batched generation for a list of prompt strings (already chat-formatted). Greedy if temperature == 0.
    Returns one dict per prompt: text (special tokens dropped), eos (did it end with EOS), new_tokens.
    Prompts are sorted by length so batches pad little; left padding, as decoder-only generation needs.
    With one_step=True each sequence stops at the next 'Step' marker and the text is cut to one step; with
    stop_at_verdict=True a judge's sequence stops right after its verdict.
    seeds (one int per prompt, with temperature > 0): each prompt samples from its own seeded generator
    (SeededGumbel: temperature, top-p, then the Gumbel-max draw), so its text does not depend on the batch.
    Without seeds, HF samples all rows from torch's global generator (and adds its default top_k=50).
    """
    if getattr(model, "engine", "hf") == "vllm":  # --engine vllm: the same generation through vLLM
        import vllm_engine
        return vllm_engine.generate(model, tokenizer, prompts, max_new_tokens, temperature, top_p, batch_size,
                                    one_step, progress, seeds=seeds, stop_at_verdict=stop_at_verdict)
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results = [None] * len(prompts)
    eos_ids = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
                  else [model.generation_config.eos_token_id or tokenizer.eos_token_id])
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(model.device)
        plen = enc["input_ids"].shape[1]
        greedy = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        if temperature > 0 and seeds is not None:
            # greedy mode, so HF adds no warpers of its own; ours run after its other processors, as in sampling
            from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper
            warpers = [TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
            sampling = dict(greedy, logits_processor=LogitsProcessorList(
                warpers + [SeededGumbel([seeds[i] for i in idx], plen)]))
        else:
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else greedy
        stop = StopAtNextStep(tokenizer, plen) if one_step else StopAtVerdict(tokenizer, plen) if stop_at_verdict \
            else None
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             stopping_criteria=[stop] if stop is not None else None, **sampling)
        new = out[:, plen:].tolist()
        for row, (i, ids) in enumerate(zip(idx, new)):
            # what the model generated: up to the token that completed the next step marker or the verdict (the rest
            # is padding, and pad may be the EOS id), or all of it; an EOS counts only if the model emitted it there
            stopped = stop.stopped_at[row] if stop is not None and stop.stopped_at else None
            generated = ids if stopped is None else ids[:stopped + 1]
            ended = next((k for k, t in enumerate(generated) if t in eos_ids), None)
            kept = generated if ended is None else generated[:ended]
            text = tokenizer.decode(kept, skip_special_tokens=True)
            results[i] = dict(text=cut_at_next_step(text) if one_step else text.strip(),
                              eos=ended is not None, new_tokens=len(kept) + (ended is not None))
        if progress is not None:
            progress.update(len(idx))
    return results


def judge_pairs(model, tokenizer, template, items, max_new_tokens=512, batch_size=64, progress=None,
                stop_at_verdict=False):
    """The model judge (paper Fig. 5): [(context, step_a, step_b)] -> [(verdict or None, raw judge text)]."""
    prompts = [chat_prompt(tokenizer, template.format(context=c, step_a=a, step_b=b)) for c, a, b in items]
    outs = generate(model, tokenizer, prompts, max_new_tokens, temperature=0.0, batch_size=batch_size,
                    progress=progress, stop_at_verdict=stop_at_verdict)  # judge decoding: greedy (not in the paper)
    return [(parse_verdict(o["text"]), o["text"]) for o in outs]


def verdict_fn(args, model, tokenizer, template, rng=None, progress=None):
    """The verdicts of common.judge_candidates: the model itself (the method), or a control (--judge) using rng."""
    if args.judge == "random":
        return random_verdicts(rng)
    if args.judge == "oracle":
        return oracle_verdicts(rng)
    return lambda comparisons: judge_pairs(
        model, tokenizer, template, [(judge_context(q, prev), a, b) for q, prev, a, b in comparisons],
        args.judge_max_new_tokens, args.batch_size, progress, args.stop_at_verdict)


# ----------------------------------------------------------------------------------------------------------------
# training: what train_sft.py and train_step_dpo.py share


def prepare_for_training(model, args):
    """
    Full fine-tuning, or LoRA on all linear projections (QLoRA when the base is 4-bit). A model loaded from an
    adapter directory (M_t under LoRA) keeps training that same adapter. With gradient checkpointing, PEFT needs
    the embedding output to require grad or no gradient reaches the adapters through the checkpointed blocks.
    """
    if hasattr(model, "peft_config"):  # a PeftModel (checked without importing peft: ~8 s per process)
        for name, p in model.named_parameters():
            p.requires_grad = "lora_" in name
    elif args.lora or args.load_in_4bit:
        from peft import LoraConfig, get_peft_model
        # paper: full fine-tuning (32 H100s); here LoRA r=16 on every linear layer (fits one 24 GB GPU in 4 bit)
        targets, layers = "all-linear", None
        if args.lora_layers:  # only the last N layers (a CPU budget): the backward pass stops below the lowest one
            num_layers = model.config.num_hidden_layers
            layers = list(range(num_layers - args.lora_layers, num_layers))
            targets = sorted({name.split(".")[-1] for name, m in model.named_modules()
                              if isinstance(m, torch.nn.Linear) and "lm_head" not in name})
        config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            target_modules=targets, layers_to_transform=layers, task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    if args.gradient_checkpointing:
        model.config.use_cache = False
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # older name (transformers 5.17)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    return model


def make_optimizer(model, args, lr, weight_decay=0.0):
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optim == "paged_adamw_8bit":
        _require("bitsandbytes", "--optim paged_adamw_8bit", "bitsandbytes")
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
    # not stated in the paper: AdamW betas (0.9, 0.95), as in most LLM fine-tuning recipes
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))


def cosine_lr(step, total_steps, max_lr, warmup_steps):
    """Linear warmup, then cosine decay to 10% of max_lr (not stated in the paper)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max_lr * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item()))


def init_distributed():
    """(rank, world_size); under torchrun this joins the process group (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return int(os.environ.get("RANK", 0)), world


def rank_slice(examples, rank, world):
    """
    This process's share under DDP: equal slices, so every process takes the same number of optimizer steps (else the
    all-reduce hangs). Fewer examples than processes: each takes them all (DDP's mean of equal gradients is the
    one-process gradient; an empty slice would have no batch to train on).
    """
    return examples[:len(examples) // world * world][rank::world] if len(examples) >= world else examples


def load_for_training(args):
    """A trainer's start: join DDP under torchrun, seed, load M_t with trainable adapters. (rank, world, model, tok)."""
    rank, world = init_distributed()
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, load_in_4bit=args.load_in_4bit, attn=args.attn, trainable=True)
    return rank, world, model, tokenizer


def padded_batch(sequences, pad_id, loss_masks=None, left=False):
    """
    Lists of token ids -> input_ids, attention_mask, position_ids (and the padded loss mask). The attention mask
    comes from the lengths, never from pad_id (Qwen's pad token is its EOS). position_ids are explicit because
    with left padding HF's default positions would count the pads.
    """
    T = max(len(s) for s in sequences)
    ids, att, lm = [], [], []
    for i, s in enumerate(sequences):
        pad = [0] * (T - len(s))
        mask = loss_masks[i] if loss_masks is not None else [0] * len(s)
        ids.append(pad + s if left else s + pad)
        att.append(pad + [1] * len(s) if left else [1] * len(s) + pad)
        lm.append(pad + mask if left else mask + pad)
    ids, att = torch.tensor(ids), torch.tensor(att)
    ids[att == 0] = pad_id
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    return ids, att, pos, torch.tensor(lm)


def train_loop(model, args, groups, micro_loss, total_steps, world, desc, weight_decay=0.0):
    """
    The optimizer loop of both trainers. groups yields, per optimizer step, the micro-batches whose gradients are
    accumulated; micro_loss(train_model, micro_batch, group) -> (loss to backpropagate, {metric: float}), already
    divided so that the group's losses add up to the step's mean. Per step: the learning rate (warmup + cosine),
    forward/backward of each micro-batch (under DDP the gradients are all-reduced once, at the last one),
    clipping at 1.0 (not stated in the paper), the update. Uses args.lr, args.warmup (a fraction of the steps) and
    args.optim. Returns the log: one dict per step with the summed metrics (and tokens/s if they count "tokens").
    """
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = make_optimizer(model, args, args.lr, weight_decay)
    warmup_steps = max(1, int(args.warmup * total_steps))
    log, t0, tokens = [], time.time(), 0
    bar = tqdm(total=total_steps, desc=desc, disable=int(os.environ.get("RANK", 0)) != 0)
    for step, group in zip(range(total_steps), groups):
        lr = cosine_lr(step, total_steps, args.lr, warmup_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        metrics = {}
        for k, mb in enumerate(group):
            last = k == len(group) - 1 or world == 1
            with (contextlib.nullcontext() if last else train_model.no_sync()):
                loss, m = micro_loss(train_model, mb, group)
                loss.backward()
            for key, value in m.items():
                metrics[key] = metrics.get(key, 0.0) + value
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # not stated in the paper: clipping at norm 1.0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += metrics.pop("tokens", 0)
        log.append(dict(step=step + 1, lr=lr, **metrics))
        if tokens:
            log[-1]["tokens_per_s"] = tokens / (time.time() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}")
    bar.close()
    return log
