"""Shared fixtures: a tiny synthetic data set and a tiny model built in the test session (no download)."""

import os
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(1)  # tiny models: one thread is faster, and CI has 2 cores


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """A small synthetic data set from prepare/synthetic.py (same generator as the default, fewer records)."""
    from prepare import synthetic
    out = tmp_path_factory.mktemp("synthetic")
    argv = sys.argv
    sys.argv = ["synthetic.py", "--out-dir", str(out), "--num-ift", "300", "--num-eft", "200",
                "--num-questions", "6,6,6", "--num-dev", "20", "--num-test", "20", "--num-eft-test", "20"]
    try:
        synthetic.main()
    finally:
        sys.argv = argv
    return str(out)


@pytest.fixture(scope="session")
def tiny_model_dir(synthetic_dir, tmp_path_factory):
    """A 2-layer, hidden-32 Llama with a BPE tokenizer trained on the synthetic corpus, saved like a hub model."""
    from prepare import tiny_model
    out = str(tmp_path_factory.mktemp("tiny") / "m0")
    texts = tiny_model.corpus_texts([os.path.join(synthetic_dir, "ift.jsonl"),
                                           os.path.join(synthetic_dir, "eft.jsonl")])
    tokenizer = tiny_model.build_tokenizer(texts, vocab_size=300)
    model = tiny_model.build_model(tokenizer, hidden=32, layers=2, heads=2, max_len=512, seed=0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    return out


def run_script(*args, env=None, check=True):
    """Run a project script in a subprocess (few of these: each one pays ~10 s of imports)."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny model and tokenizer, loaded as every stage loads a model."""
    from modeling import load_model
    model, tokenizer = load_model(tiny_model_dir)
    return model.eval(), tokenizer


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def eft_step_pairs(synthetic_dir, n):
    """Step pairs in make_pairs.py's schema from synthetic EFT records: the gold step chosen, the corrupted one not."""
    from common import BOXED, join_steps, load_prompt, read_jsonl
    template = load_prompt("reasoning_tiny")
    pairs = []
    for r in read_jsonl(os.path.join(synthetic_dir, "eft.jsonl"))[:n]:
        good, bad = (r["step_a"], r["step_b"]) if r["label"] == "A" else (r["step_b"], r["step_a"])
        pairs.append(dict(id=r["id"], question_id=r["id"], step=len(r["previous_steps"]) + 1,
                          prompt=template.format(problem=r["question"]), prefix=join_steps(r["previous_steps"]),
                          chosen=good, rejected=bad, chosen_final=BOXED in good, rejected_final=BOXED in bad))
    return pairs


def ends_within(seconds, main, what):
    """Run main() and fail if it is still running after `seconds` (a loop that never ends); a DataError is a fine
    ending too (a clear message that there is nothing to train on)."""
    from common import DataError

    def too_slow(signum, frame):
        raise TimeoutError(f"{what} still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(seconds)
    try:
        try:
            main()
        except DataError:
            pass
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
