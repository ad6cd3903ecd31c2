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


def make_synthetic(tmp_path_factory, *flags):
    """A small synthetic data set from prepare/synthetic.py (same generator as the default, fewer records)."""
    from prepare import synthetic
    out = tmp_path_factory.mktemp("synthetic")
    argv = sys.argv
    sys.argv = ["synthetic.py", "--out-dir", str(out), "--num-ift", "300", "--num-eft", "200",
                "--num-questions", "6,6,6", "--num-dev", "20", "--num-test", "20", "--num-eft-test", "20", *flags]
    try:
        synthetic.main()
    finally:
        sys.argv = argv
    return str(out)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    return make_synthetic(tmp_path_factory)


@pytest.fixture(scope="session")
def synthetic_short_dir(tmp_path_factory):
    """The previous default: short step reasons ("3 fewer"), operand-first drawing, the count judge (no reading)."""
    return make_synthetic(tmp_path_factory, "--step-reason", "short", "--op-sampling", "operand-first",
                          "--judgment-check", "count")


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
                          chosen=good, rejected=bad, chosen_final=BOXED in good, rejected_final=BOXED in bad,
                          chosen_eos=BOXED in good, rejected_eos=BOXED in bad))  # as if EOS followed the answer
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


# ----------------------------------------------------------------------------------------------------------------
# a scripted model: what it generates is fixed by the test, so the generation/search code around it can be checked


class ScriptedModel:
    """
    Makes a causal LM emit scripted tokens through HF generate (sampling included): a forward hook sets, at every
    generation step, the logit of the scripted next token to 0 and all others to -1e9. script(copy, prompt_text)
    -> token ids for one row, where copy counts the earlier rows of the batch with the same prompt (the w candidates
    of a search step are w copies of one prompt). Past the script's end the row says `filler`.
    Use as a context manager: the hook is removed on exit.
    """

    def __init__(self, model, tokenizer, script, filler):
        self.model, self.tokenizer, self.script, self.filler = model, tokenizer, script, filler

    def hook(self, module, args, kwargs, output):
        input_ids = kwargs["input_ids"]
        if input_ids.shape[1] > 1:  # the prefill of a new generate call: one script per row
            prompts = [tuple(row.tolist()) for row in input_ids]
            self.scripts = [self.script(prompts[:r].count(p), self.tokenizer.decode(p, skip_special_tokens=True))
                            for r, p in enumerate(prompts)]
            self.k = 0
        last = output.logits[:, -1, :]
        last.fill_(-1e9)
        for r, script in enumerate(self.scripts):
            last[r, script[self.k] if self.k < len(script) else self.filler] = 0.0
        self.k += 1
        return output

    def __enter__(self):
        self.handle = self.model.register_forward_hook(self.hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def pad_is_eos_search(model, tokenizer, prompt_reasoning):
    """
    The step search on a scripted model (w = 3, fake judge), for the case pad_token_id == eos_token_id (Qwen2.5's
    base models, SmolLM2): HF generate pads a row that stopped at the next "Step" marker with the pad id, which is
    then the EOS id, while another row of the batch runs on. At step n, candidate 0 writes a short step and starts
    the next marker, candidate 1 a longer one ("careful") and the marker; candidate 2 runs on to the token limit
    without a marker at steps 1-2, and at step 3 boxes the answer and emits EOS. The judge prefers a boxed step,
    then a careful one. Returns what check_pad_is_eos_search needs: the trees, the scripts' token counts, the limit.
    """
    import argparse
    import types

    import generate
    import modeling
    from common import STEP_START

    def ids(text):
        assert tokenizer.decode(ids_of(tokenizer, text)) == text, text  # the script reads back as written
        return ids_of(tokenizer, text)

    def short(n):
        return f"Step {n}: {n} + 1 = {n + 1}."

    def careful(n):
        return f"Step {n}: careful: {n} * 2 = {2 * n}."

    answer, run_on = "Step 3: The answer is \\boxed{7}.", "Step 1: " + "5 + 5 " * 40
    marker = ids_of(tokenizer, "\nStep")
    lengths = dict(short=[len(ids(short(n)) + marker) for n in (1, 2, 3)],
                   careful=[len(ids(careful(n)) + marker) for n in (1, 2, 3)], answer=len(ids(answer)) + 1)
    max_step_tokens = max(lengths["careful"] + lengths["short"] + [lengths["answer"]]) + 2
    assert len(ids(run_on)) > max_step_tokens

    def script(copy, prompt_text):
        n = len(STEP_START.findall(prompt_text)) + 1  # the step this row writes
        if copy == 0:
            return ids(short(n)) + marker
        if copy == 1:
            return ids(careful(n)) + marker
        return ids(answer) + [tokenizer.eos_token_id] if n == 3 else ids(run_on.replace("Step 1", f"Step {n}"))

    def judge_pairs(model, tokenizer, template, items, *args, **kwargs):
        key = lambda s: ("\\boxed" in s, "careful" in s, s)  # noqa: E731
        return [(v, f"[[{v}]]") for v in ("A" if key(a) > key(b) else "B" for _, a, b in items)]

    args = argparse.Namespace(prompt_reasoning=prompt_reasoning, prompt_judge="judge", num_candidates=3,
                              temperature=0.5, top_p=0.95, max_steps=5, max_step_tokens=max_step_tokens,
                              judge_max_new_tokens=8, orders=2, judge="model", no_dedupe=False, batch_size=64,
                              seed=0, stop_at_verdict=False)
    records = [dict(question="Tom has 5 pens. He buys 2 more. How many pens does he have?"),
               dict(question="Ann has 9 apples and eats 2 of them. How many are left?")]
    real_judge = modeling.judge_pairs
    modeling.judge_pairs = judge_pairs
    try:
        with ScriptedModel(model, tokenizer, script, filler=ids_of(tokenizer, "5")[0]):
            trees = generate.search(model, tokenizer, records, ["a", "b"], args,
                                    types.SimpleNamespace(update=lambda k: None))
    finally:
        modeling.judge_pairs = real_judge
    return dict(trees=trees, lengths=lengths, max_step_tokens=max_step_tokens,
                solution=[careful(1), careful(2), answer])


def check_pad_is_eos_search(trees, lengths, max_step_tokens, solution):
    """What the scripted search must give: no candidate that stopped at a step marker counts as ended by EOS."""
    for tree in trees:
        assert (tree["stop_reason"], tree["rounds"]) == ("answer", 3), (tree["stop_reason"], tree["rounds"])
        assert tree["solution_steps"] == solution
        for n, node in enumerate(tree["steps"], 1):
            short, careful, third = node["candidates"]
            assert (short["eos"], short["final"], short["new_tokens"]) == (False, False, lengths["short"][n - 1])
            assert (careful["eos"], careful["final"], careful["new_tokens"]) == \
                (False, False, lengths["careful"][n - 1])
            if n < 3:  # ran on to the token limit: no marker, no EOS
                assert (third["eos"], third["final"], third["new_tokens"]) == (False, False, max_step_tokens)
            else:  # the answer, then the EOS the model emitted
                assert (third["eos"], third["final"], third["new_tokens"]) == (True, True, lengths["answer"])


# ----------------------------------------------------------------------------------------------------------------
# presets, sourced in bash as iterate.sh sources them

FAKE_NVIDIA_SMI = """#!/bin/sh
# fake nvidia-smi: $NUM_GPUS GPUs of 80 GB
for i in $(seq 1 "$NUM_GPUS"); do
  case "$*" in
    *-L*) echo "GPU $((i - 1)): NVIDIA H100 80GB HBM3 (UUID: GPU-fake-$i)" ;;
    *) echo "81559" ;;
  esac
done
"""


def source_preset(tmp_path, num_gpus, script="presets/paper.sh", env=None, show=("NPROC", "SFT_ARGS", "DPO_ARGS")):
    """bash -c 'source <preset>; print the variables in show' with a fake nvidia-smi reporting num_gpus GPUs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "nvidia-smi"
    fake.write_text(FAKE_NVIDIA_SMI)
    fake.chmod(0o755)
    full_env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "SHARED", "DATA", "MODEL", "GEN_BATCH")}
    full_env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", NUM_GPUS=str(num_gpus), **(env or {}))
    code = f"set -euo pipefail; source {script}; " + "".join(f'printf "%s\\n" "{v}=${{{v}}}"; ' for v in show)
    return subprocess.run(["bash", "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True)


def kill_on_second_chunk(monkeypatch):
    """generate.search that dies (KeyboardInterrupt) when asked for its second chunk; returns the ids searched."""
    import generate
    real, searched = generate.search, []

    def search(model, tokenizer, records, ids, *args):
        if searched:
            raise KeyboardInterrupt("killed")
        searched.extend(ids)
        return real(model, tokenizer, records, ids, *args)
    monkeypatch.setattr(generate, "search", search)
    return real, searched
