"""
The table of a run, or of several runs side by side (the paper's Table 1: PSRLM, SRLM and the controls from one M1;
Table 5: greedy vs step search at test time, evaluate.py --search). Of a run: per model M1, M2, ... its accuracy on
the held-out test (± standard error), its step-judge accuracy on the held-out EFT pairs, steps per solution, and for
the iteration that produced it the number of preference pairs, unparseable verdicts and how often the two judging
orders disagreed.

Reads  runs/<name>/iter<t>/{eval/*.summary.json, eval/<data>.jsonl, eval/judge_eval.jsonl, trees.jsonl,
       pairs.jsonl(.stats.json)}
       and the EFT test file named in judge_eval.summary.json
Writes runs/<name>/summary.json  [{model, accuracy, accuracy_se, gain_over_m1, gain_over_m1_se (on the same
                                   problems: paired se, from eval/<data>.jsonl), judge_accuracy, judge_accuracy_se,
                                   steps_per_solution, pairs, pairs_per_question, unparsed_verdicts, verdicts_a,
                                   verdicts_b, order_disagreement, tie_rollbacks, data, pairs_right_over_wrong,
                                   pairs_wrong_over_right, pairs_both_right, pairs_both_wrong (synthetic task:
                                   chosen step right and rejected wrong, the reverse, both right, both wrong, by the
                                   task's true labels), search_generation,
                                   search_verification, search_b_share,
                                   search_right_wins, search_wrong_wins, judge_near_accuracy, judge_near_n,
                                   judge_far_accuracy, judge_far_n, judge_error_kinds, judge_read_copies
                                   (synthetic task: the judge against true labels, see verdict_check and
                                   judge_gap_check), greedy_error_kinds,
                                   pair_error_kinds (synthetic task: what is wrong in the wrong greedy solutions
                                   and in the wrong step of each right/wrong pair, see error_kinds)}]
       runs/<name>/summary.png   accuracy and judge accuracy per model
A row also holds, where evaluate.py --search ran on the model (eval/<data>.search.summary.json): search_accuracy,
search_accuracy_se, search_candidate_tokens, search_judge_tokens (mean per question), and greedy_tokens. In a run of
generate.py --mode srlm (SRLM) the labels checked are those of whole solutions (all steps right through the answer).
With several --run: the accuracy of each run's M1, M2, ... side by side; runs X, X-seed1, X-seed2 (SEED=N) also as
one row, the mean over seeds and the gain M_last - M1 per seed, mean ± se; greedy vs search for every model that
has both, and one plot of both (--plot, default comparison.png next to the first run).

    python report.py --run runs/default
    python report.py --run runs/psrlm --run runs/srlm --run runs/random --run runs/oracle
    python report.py --run runs/default --run runs/default-seed1 --run runs/default-seed2 --run runs/random ...
"""

import argparse
import collections
import glob
import itertools
import json
import os
import re
import statistics

from common import cli, read_jsonl, search_stats, split_steps, write_json
from prepare.synthetic import (ERROR_KINDS, STEP_EQUATION, STEP_REASON, solution_is_right, step_error_kind,
                               step_is_right, step_sentence)


def is_right(question, step, text, srlm):
    """The synthetic task's true label of a candidate: a step, or in an SRLM tree a whole solution."""
    return solution_is_right(question, text) if srlm else step_is_right(question, step, text)


def pair_label_check(pairs, questions, srlm=False):
    """
    Synthetic task only (labels are known): how often a self-made pair put a right step (srlm: solution) over a wrong
    one, the reverse, and how many pairs hold two right or two wrong ones (prepare/synthetic.py). questions:
    {question_id: text}. {} for other data.
    """
    if not pairs:  # nothing to check (and no way to tell synthetic questions)
        return {}
    try:
        checks = [tuple(is_right(questions[p["question_id"]], p["step"], p[side], srlm)
                        for side in ("chosen", "rejected")) for p in pairs]
    except ValueError:  # not synthetic questions
        return {}
    # a step pair both right: two steps that compute the same thing and differ in their words (a name or a verb
    # copied otherwise); the judge's verdict on them, and the oracle's coin, teach only that wording
    return dict(pairs_right_over_wrong=checks.count((True, False)), pairs_wrong_over_right=checks.count((False, True)),
                pairs_both_right=checks.count((True, True)), pairs_both_wrong=checks.count((False, False)))


def error_kinds(eval_rows, pairs, questions):
    """
    Synthetic task only: which errors the model makes and which its judge catches, by prepare/synthetic.py's
    step_error_kind. greedy_error_kinds: the kind of each wrong greedy solution's first wrong step; pair_error_kinds:
    the kind of the wrong step of each step pair that put a right step over a wrong one (right_over_wrong), and the
    reverse (wrong_over_right). {} for other data (SRLM pairs: whole solutions, not counted).
    """
    greedy, pair_kinds = collections.Counter(), dict(right_over_wrong=collections.Counter(),
                                                     wrong_over_right=collections.Counter())
    try:
        for r in eval_rows:
            if not r["correct"]:  # its first wrong step's kind; all steps right but too few: format
                found = (step_error_kind(r["question"], k, step) for k, step in enumerate(split_steps(r["output"]), 1))
                greedy[next((kind for kind in found if kind), "format")] += 1
        for p in pairs:
            question = questions[p["question_id"]]
            chosen, rejected = (step_error_kind(question, p["step"], p[side]) for side in ("chosen", "rejected"))
            if (chosen is None) != (rejected is None):
                pair_kinds["right_over_wrong" if chosen is None else "wrong_over_right"][chosen or rejected] += 1
    except (KeyError, ValueError):  # not synthetic questions, or records without their question and output
        return {}
    out = dict(greedy_error_kinds=dict(greedy)) if eval_rows else {}
    if pairs:
        out["pair_error_kinds"] = {side: dict(kinds) for side, kinds in pair_kinds.items()}
    return out


def verdict_check(trees):
    """
    Synthetic task only: generation vs verification inside the search, by the task's true step labels.
    search_generation = share of the sampled candidates that are right; search_verification = share of the judge's
    verdicts on one right and one wrong candidate that pick the right one (right_wins / (right_wins + wrong_wins)):
    self-judging can only improve the model where verification beats generation (Song et al. 2024, "Mind the Gap").
    search_b_share = share of verdicts that name B (position bias). In an SRLM tree a "verdict" is a pair of one right
    and one wrong whole solution with unequal mean scores, won by the higher score. {} for other data.
    """
    b = right_wins = wrong_wins = total = candidates = right_candidates = 0
    try:
        for tree in trees:
            for node in tree["steps"]:
                right = [is_right(tree["question"], node["step"], c["text"], tree.get("mode") == "srlm")
                         for c in node["candidates"]]
                candidates += len(right)
                right_candidates += sum(right)
                if tree.get("mode") == "srlm":
                    scores = node["scores"]
                    for i, j in itertools.combinations(range(len(right)), 2):
                        if right[i] != right[j] and None not in (scores[i], scores[j]) and scores[i] != scores[j]:
                            higher_is_right = right[i] if scores[i] > scores[j] else right[j]
                            right_wins += higher_is_right
                            wrong_wins += not higher_is_right
                for v in node["verdicts"]:
                    total += 1
                    b += v["verdict"] == "B"
                    if v["verdict"] and right[v["i"]] != right[v["j"]]:
                        winner = v["i"] if v["verdict"] == "A" else v["j"]
                        right_wins += right[winner]
                        wrong_wins += not right[winner]
    except ValueError:  # not synthetic questions
        return {}
    out = dict(search_generation=right_candidates / candidates) if candidates else {}
    if right_wins + wrong_wins:
        out.update(search_verification=right_wins / (right_wins + wrong_wins), search_right_wins=right_wins,
                   search_wrong_wins=wrong_wins)
    if total:
        out["search_b_share"] = b / total
    return out


def judge_gap_check(judge_rows, eft_rows):
    """
    Synthetic task only: step-judge accuracy on EFT pairs whose two results differ by at most 2 (near misses, the
    errors the model itself makes) and by more, and by the kind of error of the wrong step (the EFT record's
    `error`): judge_error_kinds {kind: [right, n]}. Where the judgments reread the question ("Read k: ...",
    prepare/synthetic.py: judgment): judge_read_copies [c, w], c of the w wrong verdicts copy the wrong step's
    sentence as their "Read k:" instead of the question's sentence k. {} for other data.
    """
    result = lambda step: int(STEP_EQUATION.search(step)[4])
    eft = {r["id"]: r for r in eft_rows}
    near, far, by_kind = [], [], collections.defaultdict(lambda: [0, 0])
    rereads, copies = False, 0
    try:
        for r in judge_rows:
            pair = eft[r["id"]]
            (near if abs(result(pair["step_a"]) - result(pair["step_b"])) <= 2 else far).append(r["correct"])
            if "error" in pair:
                by_kind[pair["error"]][0] += bool(r["correct"])
                by_kind[pair["error"]][1] += 1
            if "Read " in r.get("raw", ""):
                rereads = True
                copies += not r["correct"] and reads_the_wrong_step(r["raw"], pair, r["label"])
    except TypeError:  # a step without 'a op b = c': not the synthetic task
        return {}
    wrong = len(near) + len(far) - sum(near) - sum(far)
    return dict(judge_near_accuracy=sum(near) / len(near) if near else None, judge_near_n=len(near),
                judge_far_accuracy=sum(far) / len(far) if far else None, judge_far_n=len(far),
                **({"judge_error_kinds": dict(by_kind)} if by_kind else {}),
                **({"judge_read_copies": [copies, wrong]} if rereads else {}))


def reads_the_wrong_step(raw, pair, label):
    """Whether a rereading judgment's "Read k:" copies the wrong candidate's sentence where the question says another
    ("Read 4: He finds 4 more." for the question's "He finds 2 more."; the step: "Step 4: He finds 4 more: 5 + 4 =
    9.")."""
    m = STEP_REASON.match(pair["step_b" if label == "A" else "step_a"])
    return bool(m) and f"Read {m[1]}: {m[2]}. " in raw and f"{m[2]}." != step_sentence(pair["question"], int(m[1]))


def load(path):
    return json.load(open(path)) if os.path.exists(path) else {}


def mean_se(xs):
    """Mean and standard error of the mean (sample sd / sqrt(n)) of two or more numbers."""
    return statistics.mean(xs), statistics.stdev(xs) / len(xs) ** 0.5


def paired_gain(first, now):
    """
    Accuracy gain over the first model on the same problems, with the paired standard error: the per-problem
    differences (correct now - correct first, in {-1, 0, 1}) have mean = the gain and se = their sd / sqrt(n); far
    smaller than two independent accuracies' errors, as both models meet the same problems. {id: correct} each.
    """
    common = [i for i in first if i in now]
    if len(common) < 2:
        return None, None
    return mean_se([int(now[i]) - int(first[i]) for i in common])


def collect(run):
    rows, t, first = [], 0, None
    while os.path.isdir(os.path.join(run, f"iter{t}")):
        it = os.path.join(run, f"iter{t}")
        evals = [load(p) for p in sorted(glob.glob(os.path.join(it, "eval", "*.summary.json")))
                 if not p.endswith(("judge_eval.summary.json", ".search.summary.json"))]
        judge = load(os.path.join(it, "eval", "judge_eval.summary.json"))
        trees_path, pairs_path = os.path.join(it, "trees.jsonl"), os.path.join(it, "pairs.jsonl")
        trees = read_jsonl(trees_path) if os.path.exists(trees_path) else []
        search = search_stats(trees) if trees else {}  # recomputed from the merged trees (shards save their own)
        pairs_rows = read_jsonl(pairs_path) if trees and os.path.exists(pairs_path) else []
        questions, srlm = {t["id"]: t["question"] for t in trees}, bool(trees) and trees[0].get("mode") == "srlm"
        labels = pair_label_check(pairs_rows, questions, srlm)
        judge_rows = os.path.join(it, "eval", "judge_eval.jsonl")
        gaps = judge_gap_check(read_jsonl(judge_rows), read_jsonl(judge["data"])) \
            if os.path.exists(judge_rows) and os.path.exists(judge.get("data", "")) else {}
        pairs = load(os.path.join(it, "pairs.jsonl.stats.json"))
        if not evals and not judge:
            break
        test = evals[0] if evals else {}
        problems = os.path.join(it, "eval", f"{test.get('dataset')}.jsonl")
        eval_rows = read_jsonl(problems) if test and os.path.exists(problems) else []
        correct = {r["id"]: r["correct"] for r in eval_rows}
        kinds = error_kinds(eval_rows, [] if srlm else pairs_rows, questions)
        if first is None:  # M1: the baseline
            first, (gain, gain_se) = correct, (None, None)
        else:
            gain, gain_se = paired_gain(first, correct)
        scaled = load(os.path.join(it, "eval", f"{test.get('dataset')}.search.summary.json"))  # evaluate --search
        rows.append(dict(model=f"M{t + 1}", accuracy=test.get("accuracy"), accuracy_se=test.get("accuracy_se"),
                         gain_over_m1=gain, gain_over_m1_se=gain_se,
                         judge_accuracy=judge.get("judge_accuracy"), judge_accuracy_se=judge.get("judge_accuracy_se"),
                         steps_per_solution=test.get("steps_per_solution"),
                         # the pairs that trained this model were made by the previous one (iteration t)
                         pairs=pairs.get("pairs"), pairs_per_question=pairs.get("pairs_per_question"),
                         # step judge: unparseable verdicts; SRLM: unparseable scorings
                         unparsed_verdicts=sum(n["unparsed"] for t in trees for n in t["steps"]) if trees else None,
                         verdicts_a=search.get("verdicts_a"),
                         verdicts_b=search.get("verdicts_b"), order_disagreement=search.get("order_disagreement"),
                         tie_rollbacks=search.get("tie_rollbacks"), data=test.get("dataset"),
                         **labels, **verdict_check(trees), **gaps, **kinds,
                         search_accuracy=scaled.get("accuracy"), search_accuracy_se=scaled.get("accuracy_se"),
                         search_candidate_tokens=scaled.get("mean_candidate_tokens"),
                         search_judge_tokens=scaled.get("mean_judge_tokens"),
                         greedy_tokens=test.get("mean_output_tokens"),
                         other_datasets={e["dataset"]: e["accuracy"] for e in evals[1:]}))
        t += 1
    return rows


def fmt(x, pct=False):
    if x is None:
        return "-"
    return f"{100 * x:.1f}" if pct else (f"{x:.2f}" if isinstance(x, float) else str(x))


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key, label in [("accuracy", "test accuracy"), ("judge_accuracy", "judge accuracy (EFT test)")]:
        ys = [100 * r[key] if r[key] is not None else float("nan") for r in rows]
        se = [100 * (r.get(key + "_se") or 0) for r in rows]
        ax.errorbar(xs, ys, yerr=se, marker="o", capsize=3, label=label)
    ax.set_xticks(xs, [r["model"] for r in rows])
    ax.set_ylabel("%")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def scaling_table(runs):
    """Greedy vs step search (evaluate.py --search) for every model of {run name: rows} that has both; printed."""
    scaled = [(name, r) for name, rows in runs.items() for r in rows if r.get("search_accuracy") is not None]
    if scaled:
        print("\n| run | model | greedy % | tokens/question | search % | candidate tokens/question "
              "| judge tokens/question |")
        print("|---|---|---|---|---|---|---|")
        for name, r in scaled:
            print(f"| {name} | {r['model']} | {fmt(r['accuracy'], True)} ± {fmt(r['accuracy_se'], True)} "
                  f"| {fmt(r['greedy_tokens'])} | {fmt(r['search_accuracy'], True)} ± "
                  f"{fmt(r['search_accuracy_se'], True)} | {fmt(r['search_candidate_tokens'])} "
                  f"| {fmt(r['search_judge_tokens'])} |")
    return scaled


def replicate_table(runs):
    """Runs named X, X-seed1, X-seed2, ... (`SEED=N bash iterate.sh`) as one row of X: the mean accuracy of each model
    over the seeds, and the last model's gain over M1 per seed with its mean ± standard error across seeds."""
    groups = {}
    for name, rows in runs.items():
        groups.setdefault(re.sub(r"-seed\d+$", "", name), []).append(rows)
    groups = {name: seeds for name, seeds in groups.items() if len(seeds) > 1}
    if not groups:
        return
    models = min(len(rows) for seeds in groups.values() for rows in seeds)  # as far as every seed has got
    if models < 2:
        return
    print("\n| runs | seeds | " + " | ".join(f"M{t + 1} mean %" for t in range(models))
          + f" | M{models} - M1 per seed | mean ± se |")
    print("|---|---|" + "---|" * (models + 2))
    for name, seeds in groups.items():
        # a seed whose evaluation of a model is missing leaves that mean, and its own gain, as "-"
        acc = [[None if rows[t]["accuracy"] is None else 100 * rows[t]["accuracy"] for t in range(models)]
               for rows in seeds]
        means = [None if any(a[t] is None for a in acc) else statistics.mean(a[t] for a in acc) for t in range(models)]
        gains = [None if a[0] is None or a[-1] is None else a[-1] - a[0] for a in acc]
        known = [g for g in gains if g is not None]
        pooled = "{:+.1f} ± {:.1f}".format(*mean_se(known)) if len(known) > 1 else "-"
        print(f"| {name} | {len(seeds)} | " + " | ".join("-" if m is None else f"{m:.1f}" for m in means)
              + " | " + ", ".join("-" if g is None else f"{g:+.1f}" for g in gains) + f" | {pooled} |")


def compare(runs, path):
    """Several runs side by side: accuracy per model (Table 1), greedy vs search where both ran (Table 5); one plot."""
    models = max((len(rows) for rows in runs.values()), default=0)
    print("| run | " + " | ".join(f"M{t + 1} accuracy %" for t in range(models)) + " |")
    print("|---|" + "---|" * models)
    for name, rows in runs.items():
        cells = [f"{fmt(r['accuracy'], True)} ± {fmt(r['accuracy_se'], True)}" for r in rows]
        print(f"| {name} | " + " | ".join(cells + ["-"] * (models - len(rows))) + " |")
    replicate_table(runs)
    scaled = scaling_table(runs)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2 if scaled else 1, figsize=(10 if scaled else 5, 3.4), squeeze=False)
    ax = axes[0][0]
    for name, rows in runs.items():
        ys = [100 * r["accuracy"] if r["accuracy"] is not None else float("nan") for r in rows]
        ax.errorbar(range(len(rows)), ys, yerr=[100 * (r["accuracy_se"] or 0) for r in rows], marker="o", capsize=3,
                    label=name)
    ax.set_xticks(range(models), [f"M{t + 1}" for t in range(models)])
    ax.set_ylabel("test accuracy %")
    ax.legend()
    ax.grid(alpha=0.3)
    if scaled:
        ax = axes[0][1]
        xs = range(len(scaled))
        for offset, key, label in [(-0.2, "accuracy", "greedy"), (0.2, "search_accuracy", "step search")]:
            ax.bar([x + offset for x in xs], [100 * r[key] for _, r in scaled], width=0.4, label=label,
                   yerr=[100 * (r[key + "_se"] or 0) for _, r in scaled], capsize=3)
        ax.set_xticks(list(xs), [f"{name}\n{r['model']}" for name, r in scaled])
        ax.set_ylabel("test accuracy %")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="a run directory; repeat to compare runs")
    parser.add_argument("--plot", help="with several --run: the comparison plot (default: comparison.png next to "
                                       "the first run)")
    args = parser.parse_args()
    runs = {}
    for run in args.run:
        runs[os.path.basename(os.path.normpath(run))] = rows = collect(run)
        write_json(os.path.join(run, "summary.json"), rows)
        plot(rows, os.path.join(run, "summary.png"))
    if len(args.run) > 1:
        compare(runs, args.plot or os.path.join(os.path.dirname(os.path.normpath(args.run[0])), "comparison.png"))
        return
    # a model's pairs/verdict columns describe the search that trained it (run by the previous model)
    print("| model | accuracy % (± se) | vs M1, paired se | judge accuracy % | steps/solution | pairs trained on "
          "| right>wrong / wrong>right | both right / both wrong | [[A]] / [[B]] / unparsed verdicts "
          "| order disagreement | tie roll-backs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gain = "-" if r["gain_over_m1"] is None else \
            f"{100 * r['gain_over_m1']:+.1f} ± {100 * r['gain_over_m1_se']:.1f}"
        print(f"| {r['model']} | {fmt(r['accuracy'], True)} ± {fmt(r['accuracy_se'], True)} | {gain} "
              f"| {fmt(r['judge_accuracy'], True)} | {fmt(r['steps_per_solution'])} | {fmt(r['pairs'])} "
              f"| {fmt(r.get('pairs_right_over_wrong'))} / {fmt(r.get('pairs_wrong_over_right'))} "
              f"| {fmt(r.get('pairs_both_right'))} / {fmt(r.get('pairs_both_wrong'))} "
              f"| {fmt(r['verdicts_a'])} / {fmt(r['verdicts_b'])} / {fmt(r['unparsed_verdicts'])} "
              f"| {fmt(r['order_disagreement'])} | {fmt(r['tie_rollbacks'])} |")
    if any("search_b_share" in r or "judge_near_accuracy" in r for r in rows):
        print("\nsynthetic task, against true labels: in the search that trained the model, generation (right "
              "candidates %) vs verification (right picked over wrong %), [[B]] share and right-vs-wrong wins; "
              "on the EFT test, judge accuracy by result gap and pairs judged right by the wrong step's kind of "
              f"error ({' / '.join(ERROR_KINDS[:3])}) and the wrong verdicts whose \"Read k:\" copies the wrong step's "
              "sentence, not the question's")
        print("| model | generation % | verification % | [[B]] share % | right wins / wrong wins "
              "| EFT, gap <= 2: % (n) | EFT, gap > 2: % (n) | EFT by kind: right/n "
              "| EFT errors reading the wrong step |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            eft_kinds = r.get("judge_error_kinds")  # {kind: [right, n]}; EFT pairs have the first three kinds
            by_kind = " / ".join("/".join(map(str, eft_kinds.get(k, [0, 0]))) for k in ERROR_KINDS[:3]) \
                if eft_kinds else "-"
            print(f"| {r['model']} | {fmt(r.get('search_generation'), True)} "
                  f"| {fmt(r.get('search_verification'), True)} | {fmt(r.get('search_b_share'), True)} "
                  f"| {fmt(r.get('search_right_wins'))} / {fmt(r.get('search_wrong_wins'))} "
                  f"| {fmt(r.get('judge_near_accuracy'), True)} ({fmt(r.get('judge_near_n'))}) "
                  f"| {fmt(r.get('judge_far_accuracy'), True)} ({fmt(r.get('judge_far_n'))}) | {by_kind} "
                  f"| {' of '.join(map(str, r.get('judge_read_copies', ['-'])))} |")
    if any("greedy_error_kinds" in r for r in rows):
        print("\nsynthetic task, kinds of error (prepare/synthetic.py: step_error_kind; "
              f"{' / '.join(ERROR_KINDS)}): the wrong greedy test solutions' first wrong step; the wrong step of "
              "the pairs that trained the model, right over wrong and wrong over right")
        print("| model | greedy errors | pairs right>wrong | pairs wrong>right |")
        print("|---|---|---|---|")
        by_kind = lambda counts: " / ".join(str(counts.get(k, 0)) for k in ERROR_KINDS) if counts is not None else "-"
        for r in rows:
            pairs = r.get("pair_error_kinds", {})
            print(f"| {r['model']} | {by_kind(r.get('greedy_error_kinds'))} "
                  f"| {by_kind(pairs.get('right_over_wrong'))} | {by_kind(pairs.get('wrong_over_right'))} |")
    scaling_table(runs)
    print(f"wrote {args.run[0]}/summary.json and summary.png")


if __name__ == "__main__":
    cli(main)
