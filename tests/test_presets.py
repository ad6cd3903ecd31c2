"""
The presets are settings only; what they compute must hold for any machine: presets/paper.sh keeps the paper's batch
32 (batch-size x grad-accum x processes) for every GPU count that divides 32 and stops with a clear message for any
other. Sourced in bash as iterate.sh sources it, with a fake nvidia-smi on PATH that reports N GPUs.
"""

import re

import pytest

from conftest import source_preset

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
    for stage in ("SFT_ARGS", "DPO_ARGS"):
        batch, accum = flag(values[stage], "batch-size"), flag(values[stage], "grad-accum")
        assert batch >= 1 and accum >= 1 and batch * accum * num_gpus == 32, (stage, batch, accum)


@pytest.mark.parametrize("preset", ["paper", "smollm2"])
def test_inputs_come_from_the_hub_unless_a_local_folder_is_given(tmp_path, preset):
    """No SHARED: the data step downloads every set (--source hub) and evaluation reads its copies under $DATA/hub;
    SHARED=DIR: both read DIR. Nothing points at a folder a user does not have."""
    show = ("DATA", "DATA_SOURCE", "EVAL_DATA", "GEN_ARGS", "JUDGE_EVAL_ARGS")
    hub = dict(line.split("=", 1) for line in source_preset(tmp_path, 1, f"presets/{preset}.sh",
                                                            show=show).stdout.splitlines())
    assert hub["DATA_SOURCE"] == "hub"
    benchmarks = hub["EVAL_DATA"].split("--data")[1:]
    assert benchmarks and all(b.strip().startswith(f"{hub['DATA']}/hub/") for b in benchmarks)
    assert "shared" not in "".join(hub.values())
    local = dict(line.split("=", 1) for line in source_preset(tmp_path, 1, f"presets/{preset}.sh", show=show,
                                                              env=dict(SHARED="/copies")).stdout.splitlines())
    assert local["DATA_SOURCE"] == "/copies"
    assert all(b.strip().startswith("/copies/") for b in local["EVAL_DATA"].split("--data")[1:])
    # the judge is evaluated with the token budget it has in the search
    assert flag(hub["JUDGE_EVAL_ARGS"], "judge-max-new-tokens") == flag(hub["GEN_ARGS"], "judge-max-new-tokens")
