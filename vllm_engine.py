"""
The optional vLLM engine (`--engine vllm` in generate.py, judge.py, evaluate.py): the generation of
modeling.generate -- the same inputs, stopping rules, EOS rule, sampling settings and outputs -- through vLLM's
continuous batching, paged KV cache and automatic prefix caching (every judge prompt of a search step shares the
question and the previous steps). HF generate stays the default and the reference; docs/vllm.md has the measured
speed and the check that both engines write the same greedy texts.

What is kept the same, and how:
- prompts: the caller's chat-formatted strings, tokenized here as modeling.generate tokenizes them
  (add_special_tokens=False) and handed to vLLM as token ids, so vLLM adds no special token of its own;
- one step (one_step=True): the stop string "\\nStep" (common.NEXT_STEP). modeling.StopAtNextStep does not count a
  marker at the very start of the continuation, vLLM's stop strings do; a candidate stopped there is continued
  from where it stopped (a second request on prompt + its tokens), as HF generate would have gone on;
- the judge's --stop-at-verdict: the stop strings "[[A]]" and "[[B]]" (modeling.StopAtVerdict under HF);
- EOS: read from what the model emitted -- finish_reason "stop" without a stop string (stop_reason None, or the id
  of an EOS token of the model's generation config) -- never from padding (a model's pad token may be its EOS);
- text and new_tokens: decoded from the generated token ids exactly as modeling.generate decodes them (special
  tokens dropped; one step: cut at the next marker; else stripped); new_tokens counts the generated tokens up to
  the one that stopped generation, its EOS included, as HF counts them;
- sampling: temperature and top_p as given and repetition_penalty as HF generate takes it from the model's
  generation_config.json; top_k as modeling.generate samples: off with per-prompt seeds (its SeededGumbel path, the
  one the stages take), else the generation config's (HF's default 50 when sampling; vLLM's default is off). One
  seed per request: the prompt's seed (step_search.candidate_seed: question, round, candidate), so a candidate
  does not depend on its chunk or shard here either. Sampled texts are draws from the same distribution, not the
  same draws: the two engines' random streams differ.
Greedy texts agree as far as two implementations' float sums do: a near-tie between two tokens can go either way.

LoRA / QLoRA (M_t is an adapter naming its base): vLLM serves the base with the adapter applied at run time
(LoRARequest, the adapter directory as trained; no merged copy). Under --load-in-4bit the adapter was trained on
the NF4-quantized base, and vLLM (0.32) has no bitsandbytes NF4 kernels: the base is served from a copy whose
linear weights are the NF4 weights dequantized to bf16 -- exactly the weights bitsandbytes multiplies with (it
dequantizes to bf16 before each matmul) -- written once per base model (not per iteration: M_0 is the base of every
M_t) under $PSRLM_CACHE (default ~/.cache/psrlm): the base's size in bf16 (7B: 15 GB, 1.5B: 3.1 GB) of disk.

vLLM starts its engine in a spawned subprocess: a script that loads this engine needs an `if __name__ ==
"__main__":` guard. On CPU: VLLM_CPU_KVCACHE_SPACE (GiB of KV cache), fp32 and enforce_eager, as measured.
"""

import fcntl
import json
import os
import random
import re

import torch

from common import NEXT_STEP, DataError, cut_at_next_step
from modeling import load_tokenizer

VERDICT_STOPS = ["[[A]]", "[[B]]"]  # common.VERDICT's two matches, as stop strings


class VLLMModel:
    """What modeling.load_model returns for --engine vllm: the vLLM engine and what generation needs from the model."""
    engine = "vllm"  # modeling.generate dispatches on this

    def __init__(self, llm, config, lora, top_k, repetition_penalty):
        self.llm, self.config, self.lora = llm, config, lora
        self.top_k, self.repetition_penalty = top_k, repetition_penalty


def cache_dir():
    return os.environ.get("PSRLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "psrlm"))


def nf4_dequantized_copy(base, out_dir):
    """
    The base model as QLoRA trains on it, for an engine without NF4 kernels: every linear layer that
    from_pretrained(..., quantization_config=modeling.bnb_4bit_config()) quantizes gets the bf16 weight that
    bitsandbytes dequantizes it to; everything else (embeddings, norms, lm_head, biases) is the checkpoint's.
    Written once to out_dir (a lock keeps concurrent shards from writing it twice). Needs bitsandbytes (CUDA, or
    its CPU backend).
    """
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM
    from modeling import bnb_4bit_config, load_tokenizer as tokenizer_of
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    with open(out_dir + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(out_dir, "config.json")):  # another process wrote it meanwhile
            return out_dir
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"writing the NF4-dequantized copy of {base} to {out_dir} (once per base model)")
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        quantized = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map={"": device},
                                                         quantization_config=bnb_4bit_config())
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                plain.get_submodule(name).weight.data.copy_(weight.to("cpu", torch.bfloat16))
        tmp = f"{out_dir}.tmp{os.getpid()}"
        plain.save_pretrained(tmp)
        tokenizer_of(base).save_pretrained(tmp)
        os.replace(tmp, out_dir)
    return out_dir


def engine_settings():
    """The LLM(...) settings every use here shares (the stages, scripts/gpu_check.py, scripts/bench_engines.py)."""
    cuda = torch.cuda.is_available()
    if not cuda:  # else vLLM reserves 92 % of the machine's memory (gpu_memory_utilization) for its KV cache
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        # the engine core in this process, not a process of its own: on 2 cores 1.5-1.7x HF's greedy tokens/s against
        # 1.1-1.3x, and a 4 s start against ~33 s (docs/vllm.md, scripts/bench_vllm_settings.py)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return dict(dtype="bfloat16" if cuda else "float32",  # as modeling.load_model
                enforce_eager=not cuda,  # CPU: eager, no torch.compile (the setting measured in docs/vllm.md)
                enable_prefix_caching=True,  # the judge prompts of a step share the question and previous steps
                # CPU: no chunked prefill, so no prompt is split across engine steps -- vLLM 0.32 then rewinds a
                # seeded request's random generator, which a CPU generator cannot do ("does not use offset")
                enable_chunked_prefill=cuda, seed=0)


def load_model(path, load_in_4bit=False):
    """
    (VLLMModel, tokenizer) for a model directory or hub name; a LoRA adapter directory is served as base + adapter
    (LoRARequest), under --load-in-4bit on the NF4-dequantized base (nf4_dequantized_copy).
    """
    try:
        from vllm import LLM
        from vllm.lora.request import LoRARequest
    except ImportError:
        raise DataError("--engine vllm needs vLLM: pip install -r requirements-vllm.txt (docs/vllm.md)") from None
    from transformers import AutoConfig, GenerationConfig
    adapter = path if os.path.exists(os.path.join(path, "adapter_config.json")) else None
    adapter_config = json.load(open(os.path.join(path, "adapter_config.json"))) if adapter else {}
    base = adapter_config.get("base_model_name_or_path", path)
    if load_in_4bit:
        if not torch.cuda.is_available():
            raise DataError("--load-in-4bit needs a CUDA GPU (bitsandbytes 4-bit); on CPU drop the flag")
        base = nf4_dequantized_copy(base, os.path.join(cache_dir(), "nf4_dequantized", re.sub(r"[^\w.-]", "_", base)))
    cuda = torch.cuda.is_available()
    if cuda and "LOCAL_RANK" in os.environ:  # a shard of iterate.sh or torchrun: this process's GPU only
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(torch.cuda.device_count()))))
        os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[int(os.environ["LOCAL_RANK"])]
    try:
        config = AutoConfig.from_pretrained(base)
    except OSError as e:
        raise DataError(f"cannot load model {base!r}: not a local model directory and the hub is not reachable "
                        f"[{str(e).splitlines()[0]}]")
    try:
        gen_config = GenerationConfig.from_pretrained(base)
    except OSError:  # no generation_config.json: HF generate uses its defaults
        gen_config = GenerationConfig()
    lora_rank = adapter_config.get("r", 0)
    # vLLM's tokenizer only detokenizes (for the stop strings) and names the EOS: the base's (an adapter keeps it)
    llm = LLM(model=base, max_model_len=config.max_position_embeddings, enable_lora=bool(adapter),
              max_lora_rank=max(16, 1 << (lora_rank - 1).bit_length()) if adapter else 16, **engine_settings())
    lora = LoRARequest("adapter", 1, os.path.abspath(adapter)) if adapter else None
    # HF generate takes these from the model's generation config when the call does not set them
    top_k = gen_config.top_k if gen_config.top_k is not None else 50
    repetition_penalty = gen_config.repetition_penalty or 1.0
    return VLLMModel(llm, config, lora, top_k, repetition_penalty), load_tokenizer(adapter or path)


def shutdown(llm):
    """Stop the engine's processes now (their memory goes with them), not at interpreter exit."""
    engine_core = getattr(llm.llm_engine, "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown()


def finished_by_eos(completion):
    """Did generation end because the model emitted an EOS token (not a stop string, not the token limit)?"""
    return completion.finish_reason == "stop" and not isinstance(completion.stop_reason, str)


def marker_at_start_only(tokenizer, completion):
    """Stopped by a "\\nStep" that opens the continuation, which modeling.StopAtNextStep does not count."""
    if completion.stop_reason != NEXT_STEP:
        return False
    text = tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    return text.find(NEXT_STEP, 1) < 0


def generate(model, tokenizer, prompts, max_new_tokens, temperature=0.0, top_p=1.0, batch_size=64,
             one_step=False, progress=None, seeds=None, stop_at_verdict=False):
    """
    modeling.generate through vLLM: the same arguments and the same [{text, eos, new_tokens}], one per prompt.
    seeds: one sampling seed per prompt (each of a question's w repeated prompts needs its own), used as its
    request's seed; None draws them from torch's random state and samples with the model's top_k, as HF's do_sample
    path does. batch_size is not used: vLLM schedules the sequences (at most max_num_seqs at once) and all prompts
    are submitted together.
    """
    from vllm import SamplingParams
    top_k = 0 if seeds is not None else model.top_k  # 0: off, as modeling.SeededGumbel samples
    if temperature > 0 and seeds is None:
        seeds = torch.randint(2 ** 31 - 1, (len(prompts),)).tolist()
    stop = [NEXT_STEP] if one_step else VERDICT_STOPS if stop_at_verdict else None
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    generated, eos = [[] for _ in prompts], [False] * len(prompts)
    todo = list(range(len(prompts)))
    while todo:  # one round, and a second for the few candidates that opened with a step marker
        params = []
        for i in todo:
            sampling = dict(temperature=0.0)
            if temperature > 0:  # a continued request gets a seed of its own, derived from the prompt's
                seed = random.Random(seeds[i]).randrange(2 ** 31) if generated[i] else seeds[i]
                sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
            # vLLM detokenizes only for its stop strings: the texts are decoded below from the token ids
            params.append(SamplingParams(max_tokens=max_new_tokens - len(generated[i]), stop=stop,
                                         detokenize=stop is not None, repetition_penalty=model.repetition_penalty,
                                         **sampling))
        outs = model.llm.generate([{"prompt_token_ids": prompt_ids[i] + generated[i]} for i in todo], params,
                                  lora_request=model.lora, use_tqdm=False)
        again = []
        for i, out in zip(todo, outs):
            completion = out.outputs[0]
            continued = bool(generated[i])
            generated[i] = generated[i] + list(completion.token_ids)
            eos[i] = finished_by_eos(completion)
            if one_step and not continued and marker_at_start_only(tokenizer, completion) and \
                    len(generated[i]) < max_new_tokens:
                again.append(i)
        todo = again
    results = []
    for ids, ended in zip(generated, eos):
        text = tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=True)
        results.append(dict(text=cut_at_next_step(text) if one_step else text.strip(), eos=ended,
                            new_tokens=len(ids)))
    if progress is not None:
        progress.update(len(prompts))
    return results
