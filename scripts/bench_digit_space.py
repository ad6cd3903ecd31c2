"""
Benchmark: the tiny default's SFT with the space before a number as its own token (`--digit-space own`, " 16" ->
" ", "1", "6") against the space joined to its first digit (`joined`: " 1", "6"). Builds M0 both ways on the same
synthetic data and seed, then times the same number of SFT steps with iterate.sh's SFT flags, alternating the two
tokenizers `--repeats` times so both see the same machine load; prints seconds per step and tokens per second.

    python -m scripts.bench_digit_space --data data/synthetic [--steps 200] [--repeats 2] [--work /tmp/bench_ds]

Measured 2026-12-03 on a 2-core AMD EPYC (no GPU), nothing else running, --steps 150 --repeats 2, data seed 0:
    own: 0.240, 0.240 s/step      joined: 0.213, 0.187 s/step      (13,800-15,800 tokens/s either way)
"""

import argparse
import json
import os
import re
import subprocess
import sys

BATCH = 16
SFT = ["--lr", "2e-3", "--batch-size", str(BATCH), "--max-len", "1024", "--prompt-reasoning", "reasoning_tiny",
       "--prompt-judge", "judge_tiny"]  # iterate.sh's tiny SFT_ARGS, but --epochs: set to give --steps steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/synthetic", help="a prepare.synthetic output (ift.jsonl, eft.jsonl)")
    parser.add_argument("--steps", type=int, default=200, help="SFT steps timed per run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", default="/tmp/bench_digit_space")
    args = parser.parse_args()
    ift, eft = (os.path.join(args.data, f) for f in ("ift.jsonl", "eft.jsonl"))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torch's own threads, as iterate.sh's SFT
    records = sum(1 for _ in open(ift)) + sum(1 for _ in open(eft))
    epochs = args.steps * BATCH / records  # train_sft stops after int(steps_per_epoch * epochs) steps
    times = {"own": [], "joined": []}
    for mode in times:
        subprocess.run([sys.executable, "-m", "prepare.tiny_model", "--corpus", ift, eft, "--out",
                        f"{args.work}/m0-{mode}", "--digit-space", mode, "--overwrite"], check=True, env=env,
                       capture_output=True)
    for r in range(args.repeats):
        for mode in times:
            out = subprocess.run([sys.executable, "train_sft.py", "--model", f"{args.work}/m0-{mode}", "--ift", ift,
                                  "--eft", eft, "--out", f"{args.work}/m1-{mode}-{r}", "--overwrite", *SFT,
                                  "--epochs", f"{epochs:.6f}"],
                                 check=True, env=env, capture_output=True, text=True).stdout
            steps, seconds = re.search(r"trained (\d+) steps in (\d+)s", out).groups()  # the loop alone
            log = [json.loads(line) for line in open(f"{args.work}/m1-{mode}-{r}/train_log.jsonl")]
            times[mode].append((int(seconds), int(steps), log[-1]["tokens_per_s"]))
    for mode, runs in times.items():
        print(f"{mode:7s} {runs[0][1]} steps: {', '.join(f'{s / n:.3f}' for s, n, _ in runs)} s/step; "
              f"{', '.join(f'{t:.0f}' for _, _, t in runs)} tokens/s")
    own, joined = (min(s / n for s, n, _ in times[m]) for m in ("own", "joined"))
    print(f"own / joined seconds per step (best of {args.repeats}): {own / joined:.2f}")


if __name__ == "__main__":
    main()
