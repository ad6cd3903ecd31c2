"""
Several processes on CPU (gloo): train_sft.py and train_step_dpo.py run unchanged under torchrun (DDP), and their
gradients are really synchronised; every rank takes the same number of optimizer steps (else DDP's all-reduce
hangs); generate.py split with --shard i/n merges into exactly what one process writes. (evaluate.py's shards:
tests/test_evaluate.py.)

    python -m pytest tests/test_distributed.py -q
"""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import generate  # noqa: E402
import train_sft  # noqa: E402
import train_step_dpo  # noqa: E402
from conftest import eft_step_pairs  # noqa: E402
from common import read_jsonl, write_jsonl  # noqa: E402
import modeling  # noqa: E402
from modeling import load_model  # noqa: E402

TINY_PROMPTS = ["--prompt-reasoning", "reasoning_tiny", "--prompt-judge", "judge_tiny"]


def torchrun(*args, nproc=2, timeout=300):
    """`torchrun --standalone --nproc_per_node 2 <script> ...` as a subprocess; fails with its output."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), *args], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc



def weights(model_dir):
    model, _ = load_model(model_dir)
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# DDP training


def test_sft_under_torchrun(tiny_model_dir, synthetic_dir, tmp_path):
    out = str(tmp_path / "m1")
    # 12 IFT + 12 EFT examples -> 12 per rank -> 4 micro-batches of 3 -> 2 optimizer steps (grad-accum 2: no_sync)
    proc = torchrun("train_sft.py", "--model", tiny_model_dir, "--ift", os.path.join(synthetic_dir, "ift.jsonl"),
                    "--eft", os.path.join(synthetic_dir, "eft.jsonl"), "--limit", "12", "--out", out, *TINY_PROMPTS,
                    "--epochs", "1", "--batch-size", "3", "--grad-accum", "2", "--lr", "1e-3", "--max-len", "256")
    assert proc.stdout.count("trained 2 steps") == 1  # rank 0 alone saves and reports
    assert not os.path.exists(out + ".tmp")
    assert [r["step"] for r in read_jsonl(os.path.join(out, "train_log.jsonl"))] == [1, 2]
    assert os.path.exists(os.path.join(out, "sft_config.json"))
    m0, m1 = weights(tiny_model_dir), weights(out)
    assert m0.keys() == m1.keys() and all(not torch.equal(m0[k], m1[k]) for k in m0 if "layers" in k)


def test_step_dpo_with_fewer_pairs_than_processes(tiny_model_dir, synthetic_dir, tmp_path):
    """
    One pair, two processes: DDP's equal slices would be empty, and a rank with no batch used to spin forever looking
    for one (a toy run, or few pairs on many GPUs). Each process takes the pair: the update is the one-process one.
    """
    pairs, ddp, one = str(tmp_path / "pairs.jsonl"), str(tmp_path / "m2_ddp"), str(tmp_path / "m2_one")
    write_jsonl(pairs, eft_step_pairs(synthetic_dir, 1))
    flags = ["--pairs", pairs, "--lr", "1e-3", "--batch-size", "1", "--grad-accum", "1", "--model", tiny_model_dir]
    torchrun("train_step_dpo.py", *flags, "--out", ddp, timeout=120)
    subprocess.run([sys.executable, "train_step_dpo.py", *flags, "--out", one], cwd=REPO, check=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, timeout=120)
    m1, m2_ddp, m2_one = weights(tiny_model_dir), weights(ddp), weights(one)
    assert any(not torch.equal(m1[k], m2_ddp[k]) for k in m1)  # it trained
    assert all(torch.allclose(m2_ddp[k], m2_one[k], atol=1e-6) for k in m1)


def adapter_update(out_dir):
    """The first Step-DPO update of the LoRA B matrices (they start at zero, so the saved value is the update)."""
    return {k: v for k, v in load_file(os.path.join(out_dir, "adapter_model.safetensors")).items() if "lora_B" in k}


def test_step_dpo_under_torchrun_syncs_gradients(tiny_model_dir, synthetic_dir, tmp_path, monkeypatch):
    """
    DDP, 2 ranks x 2 pairs (QLoRA's setup minus the 4 bit: LoRA + gradient checkpointing) makes the same first update
    as one process on all 4 pairs: the loss is a mean over pairs and DDP averages the ranks' gradients. One process
    on rank 0's 2 pairs alone makes a different update (what an unsynchronised rank 0 would save).
    """
    pairs = eft_step_pairs(synthetic_dir, 4)
    all_pairs, rank0_pairs = str(tmp_path / "pairs.jsonl"), str(tmp_path / "rank0_pairs.jsonl")
    write_jsonl(all_pairs, pairs)
    write_jsonl(rank0_pairs, pairs[0::2])  # examples[rank::world]
    lr = 1e-3
    flags = ["--model", tiny_model_dir, "--lora", "--lora-rank", "4", "--lora-alpha", "8", "--gradient-checkpointing",
             "--lr", str(lr)]
    ddp = str(tmp_path / "ddp")
    torchrun("train_step_dpo.py", "--pairs", all_pairs, "--out", ddp, "--batch-size", "1", "--grad-accum", "2", *flags)
    assert os.path.exists(os.path.join(ddp, "dpo_config.json"))
    for rank in (0, 1):  # each rank scored its own pairs with the reference M_t
        assert [r["id"] for r in read_jsonl(f"{ddp}.ref_logps.rank{rank}.jsonl")] == [p["id"] for p in pairs[rank::2]]
    assert len(read_jsonl(os.path.join(ddp, "train_log.jsonl"))) == 1

    for name, pairs_file, batch_size in [("single", all_pairs, "4"), ("rank0_alone", rank0_pairs, "2")]:
        monkeypatch.setattr(sys, "argv", ["train_step_dpo.py", "--pairs", pairs_file, "--out", str(tmp_path / name),
                                          "--batch-size", batch_size, "--grad-accum", "1", *flags])
        train_step_dpo.main()
    ddp_update = adapter_update(ddp)
    single = adapter_update(str(tmp_path / "single"))
    rank0_alone = adapter_update(str(tmp_path / "rank0_alone"))
    assert ddp_update.keys() == single.keys() and ddp_update
    # Adam's first step moves each weight by about ±lr; the two agree to float noise, far below lr
    assert max((ddp_update[k] - single[k]).abs().max().item() for k in single) < 1e-2 * lr
    assert max((ddp_update[k] - rank0_alone[k]).abs().max().item() for k in single) > lr


def rank_step_counts(script, argv, tmp_path, monkeypatch):
    """
    Optimizer steps each of 2 ranks would take, by running main() in this process once as rank 0 and once as rank 1
    of a pretend world of 2 (DDP's wrapper and the barrier stubbed out): one cosine_lr call per optimizer step.
    """
    class NoDDP:  # a type (library code does isinstance(model, DistributedDataParallel)); gives the model back
        def __new__(cls, model):
            return model

    real_lr = modeling.cosine_lr
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", NoDDP)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    counts = []
    for rank in (0, 1):
        calls = []
        monkeypatch.setattr(modeling, "cosine_lr", lambda *a: calls.append(1) or real_lr(*a))
        monkeypatch.setattr(modeling, "init_distributed", lambda: (rank, 2))
        monkeypatch.setattr(sys, "argv", [script.__name__ + ".py", *argv, "--out", str(tmp_path / f"rank{rank}")])
        script.main()
        counts.append(len(calls))
    return counts


@pytest.mark.parametrize("num_records", [8, 9])
def test_sft_ranks_take_the_same_number_of_steps(num_records, tiny_model_dir, synthetic_dir, tmp_path, monkeypatch):
    # 9 examples over 2 ranks: 5 and 4, i.e. 2 and 1 micro-batches of 4. A rank that steps more than the others
    # waits forever in its all-reduce (seen: torchrun hangs with --limit 9 --batch-size 4).
    counts = rank_step_counts(train_sft, ["--model", tiny_model_dir, "--ift", os.path.join(synthetic_dir, "ift.jsonl"),
                                          "--limit", str(num_records), *TINY_PROMPTS, "--epochs", "1",
                                          "--batch-size", "4", "--max-len", "256"], tmp_path, monkeypatch)
    assert counts[0] == counts[1], f"optimizer steps per rank: {counts}"


@pytest.mark.parametrize("num_pairs", [4, 5])
def test_step_dpo_ranks_take_the_same_number_of_steps(num_pairs, tiny_model_dir, synthetic_dir, tmp_path,
                                                      monkeypatch):
    pairs = str(tmp_path / "pairs.jsonl")
    write_jsonl(pairs, eft_step_pairs(synthetic_dir, num_pairs))
    counts = rank_step_counts(train_step_dpo, ["--model", tiny_model_dir, "--pairs", pairs, "--batch-size", "2",
                                               "--grad-accum", "1"], tmp_path, monkeypatch)
    assert counts[0] == counts[1], f"optimizer steps per rank: {counts}"


# ----------------------------------------------------------------------------------------------------------------
# sharded generation


def test_generate_shards_merge_into_the_single_process_output(tiny_model_dir, synthetic_dir, tmp_path, monkeypatch):
    """
    Two concurrent processes (--shard 1/2 in a subprocess, --shard 0/2 in this one) and one process write the same
    bytes: every question once, in input order, same search. Exact because every draw is seeded by its question,
    not by the chunk or shard it lands in (chunks and resumes: tests/test_provenance.py).
    """
    questions = str(tmp_path / "questions.jsonl")
    write_jsonl(questions, read_jsonl(os.path.join(synthetic_dir, "test.jsonl"))[:4])
    flags = ["--model", tiny_model_dir, "--questions", questions, *TINY_PROMPTS, "--num-candidates", "2",
             "--max-steps", "2", "--max-step-tokens", "8", "--judge-max-new-tokens", "8"]
    sharded = str(tmp_path / "sharded" / "trees.jsonl")
    other = subprocess.Popen([sys.executable, "generate.py", *flags, "--out", sharded, "--shard", "1/2"], cwd=REPO,
                             env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    single = str(tmp_path / "single" / "trees.jsonl")
    for argv in (["--out", sharded, "--shard", "0/2"], ["--out", single]):
        monkeypatch.setattr(sys, "argv", ["generate.py", *flags, *argv])
        generate.main()
    output = other.communicate(timeout=300)[0]
    assert other.returncode == 0, output[-3000:]
    assert "merged 2 shards" in output  # the shard that finished last merged

    trees = read_jsonl(sharded)
    assert [t["id"] for t in trees] == ["test-0", "test-1", "test-2", "test-3"]
    assert all(t["steps"] and t["finished"] for t in trees)
    for i in range(2):
        assert [t["id"] for t in read_jsonl(f"{sharded}.shard{i}of2")] == [f"test-{k}" for k in range(i, 4, 2)]
    assert open(sharded).read() == open(single).read()

    # and again, the shards one after the other in the opposite order: the same file
    again = str(tmp_path / "again" / "trees.jsonl")
    for i in (1, 0):
        monkeypatch.setattr(sys, "argv", ["generate.py", *flags, "--out", again, "--shard", f"{i}/2"])
        generate.main()
    assert open(again).read() == open(sharded).read()


def test_shards_share_the_gpus_there_are_and_dtype_follows_torch_dtype(monkeypatch):
    """iterate.sh's tiny preset runs 2 shards (LOCAL_RANK 0, 1): on a machine with one GPU both must take cuda:0, not
    ask for a cuda:1 that is not there; TORCH_DTYPE=float32 (the tiny preset's) keeps fp32 there, bf16 otherwise."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("TORCH_DTYPE", raising=False)
    for rank in ("0", "1"):
        monkeypatch.setenv("LOCAL_RANK", rank)
        assert modeling.device_and_dtype() == (torch.device("cuda", 0), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert modeling.device_and_dtype()[0] == torch.device("cuda", 1)
    monkeypatch.setenv("TORCH_DTYPE", "float32")
    assert modeling.device_and_dtype()[1] == torch.float32
    monkeypatch.setenv("TORCH_DTYPE", "fp8")
    with pytest.raises(modeling.DataError, match="TORCH_DTYPE='fp8'"):
        modeling.device_and_dtype()
