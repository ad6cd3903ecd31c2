"""
The one shared module: what every stage needs and nothing else.

- JSONL I/O that names the file and line of bad input, atomic writes, and a resumable progress file
  (`<out>.partial`) so a stage killed halfway goes on where it stopped without duplicating records.
- Prompts (plain text files in prompts/, filled with str.format) and the chat template.
- Steps: the paper's `Step n: ` format, splitting a solution into steps and joining steps back.
- Model loading exactly as for a hub model (AutoModelForCausalLM / AutoTokenizer), with the optional
  4-bit (QLoRA), flash-attention and LoRA-adapter paths imported only when asked for.
- Batched generation with a stopping rule at the next step marker.
- Sharding across processes (`--shard i/n` or torchrun) with a deterministic merge.
"""

import json
import os
import re
import sys

import torch

# ----------------------------------------------------------------------------------------------------------------
# errors: bad input is a one-line message naming file and line, not a traceback


class DataError(ValueError):
    """Bad input (a malformed JSONL line, a missing field, a wrong flag). Printed without a traceback."""


def _excepthook(kind, value, tb):
    if issubclass(kind, DataError):
        print(f"error: {value}", file=sys.stderr)
        sys.exit(2)
    sys.__excepthook__(kind, value, tb)


sys.excepthook = _excepthook

# ----------------------------------------------------------------------------------------------------------------
# JSONL


def parse_jsonl_line(line, path, lineno, required=()):
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in required if k not in record]
    if missing:
        raise DataError(f"{path}:{lineno}: missing field(s) {missing}; the line has {sorted(record)}")
    return record


def read_jsonl(path, required=()):
    """All records of a JSONL file; blank lines are skipped; any bad line raises DataError naming file:line."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                records.append(parse_jsonl_line(line, path, lineno, required))
    return records


def write_atomic(path, text):
    """Write text to path through a temp file and a rename, so a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl(path, records):
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def skip_if_done(path, overwrite):
    """A finished stage is not redone: its output exists (written atomically, so it is complete)."""
    if os.path.exists(path) and not overwrite:
        print(f"{path} exists, skipping (pass --overwrite to redo)")
        return True
    return False


def save_config(args, path):
    """The resolved flags, saved next to the output they produced."""
    write_json(path, {k: v for k, v in sorted(vars(args).items())})


class PartialJSONL:
    """
    Progress file `<out>.partial`, appended one complete line per finished record. If the stage is killed, the next
    run reads it back (`done`), skips those records and appends the rest; `finish` writes `<out>` atomically in the
    input order and deletes the progress file. A torn last line (killed mid-write) is cut off, never parsed.
    """

    def __init__(self, out_path, key="id"):
        self.out_path, self.path, self.key = out_path, out_path + ".partial", key
        self.done = {}
        if os.path.exists(self.path):
            with open(self.path, "rb+") as f:
                data = f.read()
                keep = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
                f.truncate(keep)
            for lineno, line in enumerate(data[:keep].decode("utf-8").splitlines(), 1):
                if line.strip():
                    record = parse_jsonl_line(line, self.path, lineno, [key])
                    self.done[record[key]] = record
            print(f"resuming: {len(self.done)} records already in {self.path}")
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")

    def add(self, records):
        for r in records:
            self.done[r[self.key]] = r
            self.file.write(json.dumps(r, ensure_ascii=False) + "\n")
        self.file.flush()

    def finish(self, keys):
        self.file.close()
        write_jsonl(self.out_path, [self.done[k] for k in keys])
        os.remove(self.path)


def record_ids(records, path):
    """Every record gets a stable id: its own `id`/`idx`/`unique_id` if present, else its line index."""
    ids = []
    for i, r in enumerate(records):
        rid = r.get("id", r.get("idx", r.get("unique_id", i)))
        ids.append(str(rid))
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: ids are not unique")
    return ids


# ----------------------------------------------------------------------------------------------------------------
# sharding: `--shard i/n` by hand, or RANK/WORLD_SIZE under torchrun. Shard i takes records i, i+n, i+2n, ...


def parse_shard(spec):
    """'i/n' -> (i, n); None -> this process's rank and world size under torchrun, else (0, 1)."""
    if spec is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    m = re.fullmatch(r"(\d+)/(\d+)", spec)
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise DataError(f"--shard {spec!r}: expected i/n with 0 <= i < n")
    return int(m.group(1)), int(m.group(2))


def shard_path(out_path, shard, num_shards):
    return out_path if num_shards == 1 else f"{out_path}.shard{shard}of{num_shards}"


def merge_shards(out_path, num_shards, keys, key="id"):
    """When every shard file exists, write `out_path` in input order. Returns True if it merged."""
    paths = [shard_path(out_path, i, num_shards) for i in range(num_shards)]
    if num_shards == 1 or not all(os.path.exists(p) for p in paths):
        return False
    by_key = {r[key]: r for p in paths for r in read_jsonl(p, [key])}
    write_jsonl(out_path, [by_key[k] for k in keys])
    print(f"merged {num_shards} shards into {out_path}")
    return True


# ----------------------------------------------------------------------------------------------------------------
# prompts and steps

PROMPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")


def load_prompt(path):
    """A prompt template file; a bare name like 'judge_tiny' means prompts/judge_tiny.txt."""
    if not os.path.exists(path):
        path = os.path.join(PROMPT_DIR, path if path.endswith(".txt") else path + ".txt")
    with open(path, encoding="utf-8") as f:
        return f.read().rstrip("\n")


def chat_prompt(tokenizer, user_text):
    """The model's input up to where its answer starts: the chat template if the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                             add_generation_prompt=True)
    return user_text + "\n"  # base models without a template: plain text, the answer on the next line


# A step starts with "Step n:" at the start of a line (paper Fig. 4: 'Use "Step n: " before each step').
STEP_START = re.compile(r"^[ \t]*Step\s*\d+\s*:", re.MULTILINE)
# Generation of one candidate step stops as soon as the next step's marker begins.
NEXT_STEP = "\nStep"
BOXED = "\\boxed"


def split_steps(solution):
    """A solution text -> its steps, each starting with 'Step n:'; text before the first marker joins step 1."""
    starts = [m.start() for m in STEP_START.finditer(solution)]
    if not starts:
        return [solution.strip()] if solution.strip() else []
    starts[0] = 0
    return [solution[a:b].strip() for a, b in zip(starts, starts[1:] + [len(solution)]) if solution[a:b].strip()]


def join_steps(steps):
    """Steps -> the text the model continues from: each step on its own line, ending with a newline."""
    return "".join(s + "\n" for s in steps)


def cut_at_next_step(text):
    """Generated text -> the single step it starts with (everything from the next step marker on is dropped)."""
    i = text.find(NEXT_STEP, 1)
    return (text if i < 0 else text[:i]).strip()


def judge_context(question, steps):
    """The judge's view of the question and the steps so far (paper Fig. 5: 'Question and Partial Reasoning Steps')."""
    return question.strip() + ("\n" + "\n".join(steps) if steps else "")


# ----------------------------------------------------------------------------------------------------------------
# models


def device_and_dtype():
    # This CPU has no fast bf16 (bf16 training measured ~30x slower than fp32), so fp32 on CPU, bf16 on GPU.
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), torch.bfloat16
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


def load_model(path, load_in_4bit=False, attn="sdpa", trainable=False):
    """
    A causal LM and its tokenizer, loaded as from the hub. If `path` holds a LoRA adapter (adapter_config.json),
    its base model is loaded first (in 4 bit if asked) and the adapter put on top: that is M_t under (Q)LoRA.
    """
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
    return model, tokenizer


def save_trained(model, tokenizer, out_dir, log, args, config_name):
    """A trainer's outputs: the model, its train_log.jsonl, then its config, written last to mark the stage done."""
    save_model(model, tokenizer, out_dir)
    write_jsonl(os.path.join(out_dir, "train_log.jsonl"), log)
    save_config(args, os.path.join(out_dir, config_name))


def save_model(model, tokenizer, out_dir):
    """Full model or LoRA adapter (PEFT saves only the adapter), plus the tokenizer so the dir loads on its own."""
    model = getattr(model, "module", model)  # unwrap DDP
    tmp = out_dir.rstrip("/") + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(out_dir):
        import shutil
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


# ----------------------------------------------------------------------------------------------------------------
# batched generation


class StopAtNextStep:
    """
    Stop a sequence once its generated text contains the next step marker (custom step splitting).
    Called after every new token, it decodes only the last `window` tokens: the marker is completed by the newest
    token, so it lies among them (decoding the whole continuation each time is quadratic in its length). A marker
    at the very start of the continuation does not count (as in cut_at_next_step). HF generate keeps a sequence
    stopped once this fires, so it need not keep firing after the marker leaves the window.
    """

    def __init__(self, tokenizer, prompt_len, window=16):
        self.tokenizer, self.prompt_len, self.window = tokenizer, prompt_len, window

    def __call__(self, input_ids, scores, **kwargs):
        start = max(self.prompt_len, input_ids.shape[1] - self.window)
        texts = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
        skip = 1 if start == self.prompt_len else 0
        return torch.tensor([t.find(NEXT_STEP, skip) >= 0 for t in texts], device=input_ids.device)


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens, temperature=0.0, top_p=1.0, batch_size=64,
             one_step=False, progress=None):
    """
    Batched generation for a list of prompt strings (already chat-formatted). Greedy if temperature == 0.
    Returns one dict per prompt: text (special tokens dropped), eos (did it end with EOS), new_tokens.
    Prompts are sorted by length so batches pad little; left padding, as decoder-only generation needs.
    With one_step=True each sequence stops at the next 'Step' marker and the text is cut to one step.
    """
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
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             stopping_criteria=[StopAtNextStep(tokenizer, plen)] if one_step else None,
                             **sampling)
        new = out[:, plen:].tolist()
        for i, ids in zip(idx, new):
            ended = next((k for k, t in enumerate(ids) if t in eos_ids), None)
            kept = ids if ended is None else ids[:ended]
            kept = [t for t in kept if t != tokenizer.pad_token_id]
            text = tokenizer.decode(kept, skip_special_tokens=True)
            results[i] = dict(text=cut_at_next_step(text) if one_step else text.strip(),
                              eos=ended is not None, new_tokens=len(kept) + (ended is not None))
        if progress is not None:
            progress.update(len(idx))
    return results


# ----------------------------------------------------------------------------------------------------------------
# training setup shared by train_sft.py and train_step_dpo.py


def add_training_args(parser):
    """Flags of both trainers: full fine-tuning by default, (Q)LoRA for large models, DDP under torchrun."""
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights")
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA r")
    parser.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (scale = alpha / r)")
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="0 by default so policy and reference agree exactly at step 0 (DPO loss = log 2)")
    parser.add_argument("--load-in-4bit", action="store_true", help="QLoRA: NF4 base weights (CUDA + bitsandbytes)")
    parser.add_argument("--attn", default="sdpa", help="sdpa | flash_attention_2 (CUDA + flash-attn) | eager")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--optim", default="adamw", help="adamw | paged_adamw_8bit (bitsandbytes, CUDA)")
    parser.add_argument("--seed", type=int, default=0)


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
        config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    if args.gradient_checkpointing:
        model.config.use_cache = False
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # older name, e.g. transformers 5.17 on the GPU image
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
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))


def cosine_lr(step, total_steps, max_lr, warmup_steps):
    """Linear warmup, then cosine decay to 10% of max_lr."""
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
