"""
The table of a run: per model M1, M2, ... its accuracy on the held-out test (± standard error), its step-judge
accuracy on the held-out EFT pairs, steps per solution, and for the iteration that produced it the number of
preference pairs, unparseable verdicts and how often the two judging orders disagreed.

Reads  runs/<name>/iter<t>/{eval/*.summary.json, trees.jsonl, pairs.jsonl.stats.json}
Writes runs/<name>/summary.json  [{model, accuracy, accuracy_se, judge_accuracy, judge_accuracy_se,
                                   steps_per_solution, pairs, pairs_per_question, unparsed_verdicts,
                                   order_disagreement, tie_rollbacks, data, pairs_right_over_wrong,
                                   pairs_wrong_over_right (synthetic task: chosen step right and rejected wrong,
                                   and the reverse, by the task's true labels)}]
       runs/<name>/summary.png   accuracy and judge accuracy per model

    python report.py --run runs/default
"""

import argparse
import glob
import json
import os

from common import read_jsonl, write_json
from generate import summarize
from prepare_synthetic import step_is_right


def pair_label_check(pairs, questions):
    """
    Synthetic task only (labels are known): how often a self-made pair put a right step over a wrong one, and the
    reverse (prepare_synthetic.step_is_right). questions: {question_id: text}. {} for other data.
    """
    try:
        checks = [tuple(step_is_right(questions[p["question_id"]], p["step"], p[side]) for side in ("chosen", "rejected"))
                  for p in pairs]
    except ValueError:  # not synthetic questions
        return {}
    return dict(pairs_right_over_wrong=checks.count((True, False)), pairs_wrong_over_right=checks.count((False, True)))


def load(path):
    return json.load(open(path)) if os.path.exists(path) else {}


def collect(run):
    rows, t = [], 0
    while os.path.isdir(os.path.join(run, f"iter{t}")):
        it = os.path.join(run, f"iter{t}")
        evals = [load(p) for p in sorted(glob.glob(os.path.join(it, "eval", "*.summary.json")))
                 if not p.endswith("judge_eval.summary.json")]
        judge = load(os.path.join(it, "eval", "judge_eval.summary.json"))
        trees_path, pairs_path = os.path.join(it, "trees.jsonl"), os.path.join(it, "pairs.jsonl")
        trees = read_jsonl(trees_path) if os.path.exists(trees_path) else []
        search = summarize(trees) if trees else {}  # recomputed from the merged trees (shards save their own)
        labels = pair_label_check(read_jsonl(pairs_path), {t["id"]: t["question"] for t in trees}) \
            if trees and os.path.exists(pairs_path) else {}
        pairs = load(os.path.join(it, "pairs.jsonl.stats.json"))
        if not evals and not judge:
            break
        test = evals[0] if evals else {}
        rows.append(dict(model=f"M{t + 1}", accuracy=test.get("accuracy"), accuracy_se=test.get("accuracy_se"),
                         judge_accuracy=judge.get("judge_accuracy"), judge_accuracy_se=judge.get("judge_accuracy_se"),
                         steps_per_solution=test.get("steps_per_solution"),
                         # the pairs that trained this model were made by the previous one (iteration t)
                         pairs=pairs.get("pairs"), pairs_per_question=pairs.get("pairs_per_question"),
                         unparsed_verdicts=search.get("unparsed"), order_disagreement=search.get("order_disagreement"),
                         tie_rollbacks=search.get("tie_rollbacks"), data=test.get("dataset"),
                         **labels,
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    args = parser.parse_args()
    rows = collect(args.run)
    write_json(os.path.join(args.run, "summary.json"), rows)
    plot(rows, os.path.join(args.run, "summary.png"))
    # a model's pairs/verdict columns describe the search that trained it (run by the previous model)
    print("| model | accuracy % (± se) | judge accuracy % | steps/solution | pairs trained on | right>wrong / "
          "wrong>right | unparsed verdicts | order disagreement | tie roll-backs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {fmt(r['accuracy'], True)} ± {fmt(r['accuracy_se'], True)} "
              f"| {fmt(r['judge_accuracy'], True)} | {fmt(r['steps_per_solution'])} | {fmt(r['pairs'])} "
              f"| {fmt(r.get('pairs_right_over_wrong'))} / {fmt(r.get('pairs_wrong_over_right'))} "
              f"| {fmt(r['unparsed_verdicts'])} | {fmt(r['order_disagreement'])} | {fmt(r['tie_rollbacks'])} |")
    print(f"wrote {args.run}/summary.json and summary.png")


if __name__ == "__main__":
    main()
