"""
Synthetic task only: does the self-judge fail where its own arithmetic fails? For every in-search comparison of a
right candidate with a wrong one (true labels: prepare/synthetic.py: step_is_right), this counts whether the verdict
was right, split by whether the judge's own work in its explanation was right:
  "vs"/"diff" judgments recompute the step ("Want Step 2: ... = 14."): is that value the true one?
  "inverse" judgments undo each candidate ("A: 13 + 3 = 16 vs 17"): is each line true to the candidate's result,
  the true inverse operation and operand, the arithmetic, and the true previous value? (tasks with + and - only)

    python -m scripts.judge_recompute_check runs/default/iter1/trees.jsonl runs/default/iter2/trees.jsonl
"""

import re
import sys
from collections import Counter

from common import read_jsonl
from prepare.synthetic import STEP_EQUATION, apply, solve, step_is_right

WANT = re.compile(r"Want Step \d+: [^:]*: \d+ [-+*/] \d+ = (\d+)")
UNDO = re.compile(r"([AB]): (-?\d+) ([-+]) (\d+) = (-?\d+) vs (-?\d+)")


def own_work_ok(raw, values, k, shown):
    """shown: {"A": candidate text, "B": ...}; values: the true running values; k: the step judged."""
    if k >= len(values):
        return False
    want = WANT.search(raw)
    if want:
        return int(want[1]) == values[k]
    lines = {m[1]: m for m in UNDO.finditer(raw)}
    prev, now = values[k - 1], values[k]
    inverse, operand = ("-", now - prev) if now >= prev else ("+", prev - now)
    for side, text in shown.items():
        m, eq = lines.get(side), STEP_EQUATION.search(text)
        if m is None or eq is None or int(m[2]) != int(eq[4]) or (m[3], int(m[4])) != (inverse, operand) \
                or apply(m[3], int(m[2]), int(m[4])) != int(m[5]) or int(m[6]) != prev:
            return False
    return True


def recompute_check(trees):
    counts = Counter()
    for t in trees:
        values = solve(t["question"])
        for st in t["steps"]:
            k, cands = st["step"], st["candidates"]
            right = [step_is_right(t["question"], k, c["text"]) for c in cands]
            for v in st["verdicts"]:  # i was shown as A, j as B, in either order (judge.pairs_to_judge)
                if right[v["i"]] == right[v["j"]] or v["verdict"] is None:
                    continue
                work = own_work_ok(v["raw"], values, k, {"A": cands[v["i"]]["text"], "B": cands[v["j"]]["text"]})
                verdict_ok = (v["verdict"] == "A") == right[v["i"]]
                counts["work " + ("right" if work else "wrong"), "verdict " + ("right" if verdict_ok else "wrong")] += 1
    return counts


if __name__ == "__main__":
    for path in sys.argv[1:]:
        c = recompute_check(read_jsonl(path))
        print(path, " | ".join(f"judge's own work {w}: {c[('work ' + w, 'verdict right')]} right / "
                               f"{c[('work ' + w, 'verdict wrong')]} wrong verdicts" for w in ("right", "wrong")))
