"""
What a run trained on `prepare.synthetic --noisy-facts` did with the wrong facts (docs/experiments.md, "Wrong facts in
the solutions"): how many of the data's solutions end wrong; per model, the wrong greedy solutions whose first wrong
step writes a wrong fact's wrong result, against the rest; per search, the steps on a wrong fact (right prefix) whose
candidates are all wrong, mixed, or all right (a step whose candidates agree gives no pair), and the judge's verdicts
for a wrong candidate over a right one: on a wrong fact's step, and in all.

    python -m scripts.wrong_facts --run runs/nf-seed0 --data data/nf-seed0
"""

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import read_jsonl, split_steps  # noqa: E402
from prepare.synthetic import (STEP_EQUATION, parse_question, solution_is_right, solve, step_error_kind,  # noqa: E402
                               step_is_right, wrong_facts_of)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", required=True, help="the prepare.synthetic output the run trained on")
    args = parser.parse_args()
    config = json.load(open(os.path.join(args.data, "config.json")))
    if not config.get("noisy_facts"):
        sys.exit(f"{args.data} was made without --noisy-facts")
    wrong = wrong_facts_of(config)
    ift = read_jsonl(os.path.join(args.data, "ift.jsonl"), ["question", "solution"])
    print(f"{len(wrong)} wrong facts; {sum(not solution_is_right(r['question'], r['solution']) for r in ift)} of "
          f"{len(ift)} solutions end wrong")
    uses = {fact: [0, 0] for fact in wrong}  # fact: [written wrong, used] in the solutions
    for r in ift:
        for step in split_steps(r["solution"]):
            m = STEP_EQUATION.search(step)
            if (fact := (int(m[1]), m[2], int(m[3]))) in uses:
                uses[fact][0] += wrong[fact] == int(m[4])
                uses[fact][1] += 1
    by_fact = {fact: [] for fact in wrong}  # fact: right candidates of six on each of its steps in the first search

    print("model | greedy first errors: a wrong fact / other | search: steps on a wrong fact, candidates all wrong / "
          "mixed / all right | search: verdicts for a wrong candidate over a right one, on a wrong fact / all")
    for t in range(len(glob.glob(os.path.join(args.run, "iter*")))):
        evals = [p for p in glob.glob(os.path.join(args.run, f"iter{t}", "eval", "*.jsonl"))
                 if not os.path.basename(p).startswith("judge_eval")]
        on_fact = other = 0
        for r in read_jsonl(evals[0], ["question", "output", "correct"]) if evals else []:
            if r["correct"]:
                continue
            k, step = next((k, s) for k, s in enumerate(split_steps(r["output"]) + [""], 1)
                           if step_error_kind(r["question"], k, s))
            m = STEP_EQUATION.search(step)
            if m and wrong.get((int(m[1]), m[2], int(m[3]))) == int(m[4]):
                on_fact += 1
            else:
                other += 1
        counts = [0, 0, 0]  # the search that trained model t+1 (iter{t+1}/trees.jsonl), from model t
        wrong_wins = [0, 0]  # verdicts picking a wrong candidate over a right one: on a wrong fact's step, all
        trees = os.path.join(args.run, f"iter{t + 1}", "trees.jsonl")
        for tree in read_jsonl(trees, ["question", "steps"]) if os.path.exists(trees) else []:
            values, (_, ops) = solve(tree["question"]), parse_question(tree["question"])
            for st in tree["steps"]:
                k = st["step"]
                right = [step_is_right(tree["question"], k, c["text"]) for c in st["candidates"]]
                fact = (values[k - 1], *ops[k - 1]) if k <= len(ops) else None
                picks = [v["i"] if v["verdict"] == "A" else v["j"] for v in st["verdicts"]
                         if v["verdict"] and right[v["i"]] != right[v["j"]]]  # of one right and one wrong candidate
                wrong_picks = sum(not right[i] for i in picks)
                wrong_wins[0] += wrong_picks * (fact in wrong)
                wrong_wins[1] += wrong_picks
                if fact not in wrong or not all(
                        step_is_right(tree["question"], j, s) for j, s in enumerate(st["prefix_steps"], 1)):
                    continue
                if t == 0:
                    by_fact[fact].append(sum(right))
                counts[0 if not any(right) else 2 if all(right) else 1] += 1
        search = (" / ".join(map(str, counts)) + " | " + " / ".join(map(str, wrong_wins))
                  if os.path.exists(trees) else "- | -")
        print(f"M{t + 1} | {on_fact} / {other} | {search}" if evals else f"M{t + 1} | - | {search}")
    print("wrong fact | written wrong / uses in the solutions | right candidates on each of its steps, first search")
    for (a, op, b), steps in sorted(by_fact.items()):
        print(f"{a} {op} {b} | {uses[a, op, b][0]} / {uses[a, op, b][1]} | {steps}")


if __name__ == "__main__":
    main()
