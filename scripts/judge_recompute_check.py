"""
Synthetic task only: does the self-judge fail where it recomputes the step wrongly? The tiny judge first writes the
step as it should be ("Want Step 2: ... = 14."), then checks each candidate against it. For every in-search
comparison of a right candidate with a wrong one (true labels: prepare_synthetic.step_is_right), this counts whether
the verdict was right, split by whether the judge's own "Want" value is the true one.

    python scripts/judge_recompute_check.py runs/default/iter1/trees.jsonl runs/default/iter2/trees.jsonl
"""

import os
import re
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import read_jsonl  # noqa: E402
from prepare_synthetic import solve, step_is_right  # noqa: E402

WANT = re.compile(r"Want Step \d+: [^:]*: \d+ [-+*/] \d+ = (\d+)")


def recompute_check(trees):
    counts = Counter()
    for t in trees:
        values = solve(t["question"])
        for st in t["steps"]:
            k, cands = st["step"], st["candidates"]
            for v in st["verdicts"]:
                a, b = (v["i"], v["j"]) if v["order"] == "ab" else (v["j"], v["i"])  # a was shown as A
                right_a, right_b = (step_is_right(t["question"], k, cands[x]["text"]) for x in (a, b))
                if right_a == right_b or v["verdict"] is None:
                    continue
                m = WANT.search(v["raw"])
                want_ok = m is not None and k < len(values) and int(m[1]) == values[k]
                verdict_ok = (v["verdict"] == "A") == right_a
                counts["want " + ("right" if want_ok else "wrong"), "verdict " + ("right" if verdict_ok else "wrong")] += 1
    return counts


if __name__ == "__main__":
    for path in sys.argv[1:]:
        c = recompute_check(read_jsonl(path))
        print(path, " | ".join(f"{w}: {c[(w, 'verdict right')]} right / {c[(w, 'verdict wrong')]} wrong verdicts"
                               for w in ("want right", "want wrong")))
