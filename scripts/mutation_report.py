"""Per-package mutation scores of `make mutation` from mutmut 3's results under mutants/.

    python scripts/mutation_report.py --scope   # the mutant-name globs of the scope, for `mutmut run`
    python scripts/mutation_report.py           # the table: total, killed, survived, no tests, timeout/suspicious,
                                                # equivalent (listed in scripts/mutation_equivalent.txt), score

score = killed / (total - equivalent); a survivor judged equivalent counts in `equivalent`, not in `survived`.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The core computations (no stage or figure orchestration): in trainer.py only the learning-rate schedule, in
# data.py only the split and the balanced/nested subsets, in detection.py only the balanced held-out split.
SCOPE = [
    "synthgap_helpers.gap.measures.*",
    "synthgap_helpers.gap.detection.x_balanced_split__*",
    "synthgap_helpers.curation.scores.*",
    "synthgap_helpers.curation.selection.*",
    "synthgap_helpers.lowdata.containment.*",
    "synthgap_helpers.train.batches.*",
    "synthgap_helpers.train.trainer.x_lr_at__*",
    "synthgap_helpers.train.trainer.*TrainParams*total_steps__*",
    "synthgap_helpers.results.*",
    "synthgap_helpers.data.x_balanced_indices__*",
    "synthgap_helpers.data.x_nested_order__*",
    "synthgap_helpers.data.x_make_split__*",
    "synthgap_helpers.data.x__split_problem__*",
]
KILLED = {1, 3, 37, -11, -9}  # a failing test (3: pytest internal error), the type check, a crash
TIMEOUT = {24, -24, 36, 152, 255}
NO_TESTS = {5, 33}


def equivalent() -> dict[str, str]:
    """Mutant name -> why it is equivalent, from scripts/mutation_equivalent.txt (`name  reason` per line)."""
    path = ROOT / "scripts" / "mutation_equivalent.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    pairs = [line.split(maxsplit=1) for line in lines if line.strip() and not line.startswith("#")]
    return {pair[0]: pair[1] if len(pair) > 1 else "" for pair in pairs}


def package(name: str) -> str:
    """gap, curation, lowdata, train, results or data."""
    return name.split(".")[1]


def main() -> None:
    if sys.argv[1:] == ["--scope"]:
        print(" ".join(SCOPE))
        return
    codes = {}
    for meta in (ROOT / "mutants").rglob("*.py.meta"):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    names = sorted(n for n in codes if any(fnmatch.fnmatchcase(n, g) for g in SCOPE))
    same = equivalent()
    table: dict[str, Counter] = {}
    survivors = []
    for name in names:
        code, row = codes[name], table.setdefault(package(name), Counter())
        row["total"] += 1
        if code in KILLED:  # also when listed as equivalent: then the list is out of date (reported below)
            row["killed"] += 1
        elif name in same:
            row["equivalent"] += 1
        elif code in TIMEOUT or (code is not None and code not in NO_TESTS and code != 0):
            row["timeout/suspicious"] += 1
        elif code is None:
            row["not checked"] += 1
        else:
            row["no tests" if code in NO_TESTS else "survived"] += 1
            survivors.append(name)
    columns = ["total", "killed", "survived", "no tests", "equivalent", "timeout/suspicious", "not checked"]
    print(f"{'package':10}" + "".join(f"{c:>20}" for c in columns) + f"{'score':>9}")
    for pkg in ("gap", "curation", "lowdata", "train", "results", "data"):
        row = table.get(pkg, Counter())
        scored = row["total"] - row["equivalent"]
        score = f"{100 * row['killed'] / scored:.1f}%" if scored else "-"
        print(f"{pkg:10}" + "".join(f"{row[c]:>20}" for c in columns) + f"{score:>9}")
    print(f"\n{len(survivors)} survivors not judged equivalent (mutmut show NAME):")
    for name in survivors:
        print("  " + name)
    stale = [n for n in same if n in codes and codes[n] in KILLED]
    if stale:
        print("\nlisted as equivalent but killed (drop them from scripts/mutation_equivalent.txt): " + " ".join(stale))


if __name__ == "__main__":
    main()
