"""The loop as a user runs it: `bash iterate.sh` with tiny sizes, a rerun that redoes nothing, a search stage
killed halfway that resumes without redoing or duplicating questions, and `OVERWRITE=1` after a run from another
INIT killed in its search, which reproduces the clean run exactly."""

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, kill_on_second_chunk

TINY = dict(
    NUM_ITERS="2",
    SYNTH_ARGS="--num-ift 200 --num-eft 100 --num-questions 4,4,4 --num-dev 10 --num-test 12 --num-eft-test 8",
    MODEL_ARGS="--hidden 32 --layers 2 --heads 2 --vocab-size 300",
    SFT_ARGS="--epochs 1 --lr 3e-3 --batch-size 32 --max-len 512",
    GEN_ARGS="--orders 2 --num-candidates 3 --max-steps 3 --max-step-tokens 24 --judge-max-new-tokens 24 --batch-size 64",
    DPO_ARGS="--lr 1e-3 --batch-size 4 --grad-accum 1",
    EVAL_ARGS="--max-new-tokens 48 --batch-size 64",
    JUDGE_EVAL_ARGS="--judge-max-new-tokens 24 --batch-size 64",
)


def iterate(tmp_path):
    env = dict(os.environ, RUN_DIR=str(tmp_path / "run"), DATA=str(tmp_path / "data"), **TINY)
    proc = subprocess.run(["bash", "iterate.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def wait_for_lock(path, seconds):
    """Take a run's lock (iterate.sh's and every stage's), failing if some process still holds it after `seconds`."""
    with open(path, "a") as lock:
        end = time.time() + seconds
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError:
                assert time.time() < end, f"a process of the stopped run still holds {path} after {seconds} s"
                time.sleep(0.1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("iterate")
    first = iterate(tmp_path)
    return tmp_path, first


def test_two_iterations_write_well_formed_outputs(run_dir):
    tmp_path, _ = run_dir
    run = tmp_path / "run"
    for t in range(3):  # iter0 = M1, iter1 = M2, iter2 = M3
        assert (run / f"iter{t}" / "model" / "config.json").exists()
        summary = json.load(open(run / f"iter{t}" / "eval" / "data.summary.json"))
        assert summary["n"] == 12 and 0.0 <= summary["accuracy"] <= 1.0
        judge = json.load(open(run / f"iter{t}" / "eval" / "judge_eval.summary.json"))
        assert judge["n"] == 8
    for t in (1, 2):
        trees = [json.loads(l) for l in open(run / f"iter{t}" / "trees.jsonl")]
        assert [tr["id"] for tr in trees] == [f"questions{t}-{k}" for k in range(4)]  # each question once, in order
        assert all(tr["stop_reason"] in ("answer", "eos", "max_steps", "empty", "too_long") for tr in trees)
        pairs = [json.loads(l) for l in open(run / f"iter{t}" / "pairs.jsonl")]
        assert all(p["chosen"] != p["rejected"] for p in pairs)
        assert json.load(open(run / f"iter{t}" / "pairs.jsonl.stats.json"))["pairs"] == len(pairs)
    rows = json.load(open(run / "summary.json"))
    assert [r["model"] for r in rows] == ["M1", "M2", "M3"]
    assert all(set(r) >= {"accuracy", "accuracy_se", "judge_accuracy", "steps_per_solution", "pairs"} for r in rows)
    assert (run / "summary.png").stat().st_size > 1000


def test_rerun_redoes_nothing(run_dir):
    tmp_path, _ = run_dir
    run = tmp_path / "run"
    outputs = [run / "iter0" / "model" / "model.safetensors", run / "iter1" / "trees.jsonl",
               run / "iter1" / "pairs.jsonl", run / "iter2" / "model" / "model.safetensors",
               run / "iter2" / "eval" / "data.jsonl"]
    before = [os.path.getmtime(p) for p in outputs]
    second = iterate(tmp_path)
    assert [os.path.getmtime(p) for p in outputs] == before
    assert second.stdout.count("skipping") >= 12  # every stage of M1..M3 said so
    assert "optimizer steps" not in second.stdout  # no trainer started
    assert "search (questions done)" not in second.stderr  # no search started


def test_search_killed_halfway_resumes_without_duplicates(tiny_model_dir, synthetic_dir, tmp_path, monkeypatch):
    import generate
    questions = os.path.join(synthetic_dir, "questions1.jsonl")
    out = str(tmp_path / "trees.jsonl")
    argv = ["generate.py", "--model", tiny_model_dir, "--questions", questions, "--out", out,
            "--prompt-reasoning", "reasoning_tiny", "--prompt-judge", "judge_tiny", "--judge", "random",
            "--num-candidates", "2", "--max-steps", "2", "--max-step-tokens", "8", "--questions-per-chunk", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    real_search, searched = kill_on_second_chunk(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        generate.main()
    assert not os.path.exists(out) and len(open(out + ".partial").readlines()) == 1 + 2  # the manifest, 2 trees

    resumed = []
    monkeypatch.setattr(generate, "search", lambda m, t, r, ids, *a: resumed.extend(ids) or real_search(m, t, r, ids, *a))
    generate.main()
    trees = [json.loads(l) for l in open(out)]
    assert [t["id"] for t in trees] == [f"questions1-{k}" for k in range(6)]  # every question once, in order
    assert not set(resumed) & set(searched)  # the finished chunk was not searched again
    assert not os.path.exists(out + ".partial")


def test_overwrite_after_another_init_and_a_killed_search_reproduces_the_clean_run(run_dir):
    """
    A run started from another M1 (here M0) and killed in the middle of its search, then rerun with `OVERWRITE=1`
    and the clean run's M1 as INIT: every output of M1's evaluation and of iteration 1 is byte-identical to the
    clean run's. Nothing of the killed run survives (its M1 link, its evaluation with other flags, its progress
    file), and neither the chunk size (1 here, 128 in the clean run) nor the shards (1 process here, 2 in the clean
    run) change the trees. (With these tiny settings M1's judge ties every step, so Step-DPO gets no pair and saves
    M1 unchanged: the trees, verdicts and evaluations are what this compares.)
    """
    tmp_path, _ = run_dir
    clean, again = tmp_path / "run", tmp_path / "again"
    env = dict(os.environ, **dict(TINY, NUM_ITERS="1", NPROC="1", RUN_DIR=str(again), DATA=str(tmp_path / "data"),
                                  MODEL=str(clean / "m0")))
    env["GEN_ARGS"] += " --questions-per-chunk 1"
    other = dict(env, INIT=str(clean / "m0"), EVAL_ARGS="--max-new-tokens 8",
                 JUDGE_EVAL_ARGS="--judge-max-new-tokens 8")
    killed = subprocess.Popen(["bash", "iterate.sh"], cwd=ROOT, env=other, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    partial = again / "iter1" / "trees.jsonl.partial"
    try:
        while not (partial.exists() and '"steps"' in partial.read_text()):  # a search tree is in the progress file
            assert killed.poll() is None, "the run ended before its search could be killed"
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    wait_for_lock(again / ".lock", 60)  # the killed stages hold the run's lock until they are gone
    proc = subprocess.run(["bash", "iterate.sh"], cwd=ROOT, env=dict(env, INIT=str(clean / "iter0" / "model"),
                                                                     OVERWRITE="1"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    outputs = ["iter0/eval/data.jsonl", "iter0/eval/judge_eval.jsonl", "iter1/trees.jsonl", "iter1/pairs.jsonl",
               "iter1/model/model.safetensors", "iter1/eval/data.jsonl", "iter1/eval/judge_eval.jsonl"]
    for name in outputs:
        assert (again / name).read_bytes() == (clean / name).read_bytes(), name
    assert not list(again.rglob("*.partial"))


def test_a_kill_of_the_script_stops_its_running_stage(run_dir):
    """A SIGTERM to iterate.sh's own pid (not its process group) stops the stage it is running at once, here an SFT
    that would run for minutes: the run's lock, which every stage holds, is free within seconds."""
    tmp_path, _ = run_dir
    out = tmp_path / "stopped"
    env = dict(os.environ, **dict(TINY, RUN_DIR=str(out), DATA=str(tmp_path / "data"),
                                  MODEL=str(tmp_path / "run" / "m0"), SFT_ARGS="--epochs 1000 --batch-size 8"))
    log = tmp_path / "stopped.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(["bash", "iterate.sh"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    try:
        while "train_sft.py" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(3)  # the SFT is running
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=20) == 130
        wait_for_lock(out / ".lock", 20)  # the SFT holds it while it runs
        assert not (out / "iter0" / "model").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_screen_runs_one_loop_per_seed_at_one_thread_and_reports_them_together(tmp_path):
    """scripts/screen.sh: a loop per seed at once, each on its own data seed, every process one thread (the training
    too), then report.py's row of the seeds with the mean gain. A bad TRAIN_THREADS stops iterate.sh before it
    starts."""
    env = dict(os.environ, **dict(TINY, NUM_ITERS="1"), NAME="try", SEEDS="0 1", RUNS=str(tmp_path / "runs"),
               DATAS=str(tmp_path / "data"))
    proc = subprocess.run(["bash", "scripts/screen.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for s in (0, 1):
        run = tmp_path / "runs" / f"try-seed{s}"
        assert [r["model"] for r in json.load(open(run / "summary.json"))] == ["M1", "M2"]
        log = (tmp_path / "runs" / f"try-seed{s}.log").read_text()
        assert "+ env OMP_NUM_THREADS=1 python train_sft.py" in log and "--shard 1/" not in log
        assert "/dev.jsonl" in log and "/test.jsonl" not in log  # the dev split unless told otherwise
    questions = [(tmp_path / "data" / f"try-seed{s}" / "questions1.jsonl").read_text() for s in (0, 1)]
    assert questions[0] != questions[1]
    assert "| try | 2 |" in proc.stdout  # the seeds as one row, with the mean gain ± se

    bad = subprocess.run(["bash", "iterate.sh"], cwd=ROOT, env=dict(env, TRAIN_THREADS="0",
                                                                     RUN_DIR=str(tmp_path / "bad")),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "TRAIN_THREADS=0: a positive integer" in bad.stderr
    assert not (tmp_path / "bad").exists()
    for seeds in (" ", "0 x"):  # refused before any loop starts
        bad = subprocess.run(["bash", "scripts/screen.sh"], cwd=ROOT, env=dict(env, SEEDS=seeds,
                                                                               RUNS=str(tmp_path / "bad")),
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "non-negative integers" in bad.stderr and not (tmp_path / "bad").exists()


def test_editing_iterate_sh_while_it_runs_leaves_the_running_loop_as_it_was(tmp_path):
    """bash reads a script as it runs it. A user edits iterate.sh (written in place, as many editors and tools do)
    while a loop runs from it: the running loop still runs the stages it started with, the edit reaches the next
    run. A `python` on PATH that only logs its arguments stands in for every stage, and makes the edit at the first."""
    script = tmp_path / "iterate.sh"
    shutil.copy(os.path.join(ROOT, "iterate.sh"), script)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text(f"""#!{sys.executable}
import sys
log, script = {str(tmp_path / "calls.log")!r}, {str(script)!r}
with open(log, "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
text = open(script).read()
if "EDITED" not in text:  # the edit: the last stage renamed, the file written in place (same inode) and longer
    with open(script, "w") as f:
        f.write(text.replace('run python report.py --run "$R"', 'run python EDITED_report.py --run "$R"'))
""")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls[0].startswith("-m prepare.synthetic") and "EDITED" in script.read_text()  # edited at the first stage
    assert calls[-1].startswith("report.py --run runs/default")  # the loop ran the script it started with
    assert not any("EDITED" in c for c in calls)
    assert sum(c.startswith("train_step_dpo.py") for c in calls) == 3
