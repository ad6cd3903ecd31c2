"""
The presets are settings only; what they compute must hold for any machine: presets/paper.sh keeps the paper's batch
32 (batch-size x grad-accum x processes) for every GPU count that divides 32 and stops with a clear message for any
other. Sourced in bash as iterate.sh sources it, with a fake nvidia-smi on PATH that reports N GPUs.
"""

import os
import re
import subprocess

import pytest

from conftest import ROOT

FAKE_NVIDIA_SMI = """#!/bin/sh
# fake nvidia-smi: $NUM_GPUS GPUs of 80 GB
for i in $(seq 1 "$NUM_GPUS"); do
  case "$*" in
    *-L*) echo "GPU $((i - 1)): NVIDIA H100 80GB HBM3 (UUID: GPU-fake-$i)" ;;
    *) echo "81559" ;;
  esac
done
"""


def source_preset(tmp_path, num_gpus, script="presets/paper.sh", env=None):
    """bash -c 'source <preset>; print the variables' with a fake nvidia-smi reporting num_gpus GPUs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "nvidia-smi"
    fake.write_text(FAKE_NVIDIA_SMI)
    fake.chmod(0o755)
    full_env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "SHARED", "DATA", "MODEL", "GEN_BATCH")}
    full_env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", NUM_GPUS=str(num_gpus), **(env or {}))
    code = f'set -euo pipefail; source {script}; printf "%s\\n" "NPROC=$NPROC" "SFT=$SFT_ARGS" "DPO=$DPO_ARGS"'
    return subprocess.run(["bash", "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True)


def flag(args, name):
    return int(re.search(rf"--{name} (\d+)", args).group(1))


@pytest.mark.parametrize("num_gpus", [1, 2, 3, 4, 8, 16])
def test_paper_preset_keeps_the_global_batch_32_or_says_why_not(tmp_path, num_gpus):
    proc = source_preset(tmp_path, num_gpus)
    if 32 % num_gpus:
        assert proc.returncode != 0 and "batch 32 cannot be split evenly over NPROC=3" in proc.stderr, proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    values = dict(line.split("=", 1) for line in proc.stdout.splitlines())
    assert int(values["NPROC"]) == num_gpus
    for stage in ("SFT", "DPO"):
        batch, accum = flag(values[stage], "batch-size"), flag(values[stage], "grad-accum")
        assert batch >= 1 and accum >= 1 and batch * accum * num_gpus == 32, (stage, batch, accum)
