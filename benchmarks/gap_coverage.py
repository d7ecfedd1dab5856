"""Coverage of the domain-gap intervals by simulation: how often the nominal 95% interval holds its target.

    PYTHONPATH=. python benchmarks/gap_coverage.py --dim 16 --n 200 --repeats 200 --shift 0 0.15

Each repeat draws a reference, a floor and a set from Gaussians in `--dim` dimensions (the floor like the
reference, the set shifted by `--shift` in every coordinate), `--n` rows each, and runs `gap.measures.gap_table`.
Targets: the expected value of FD, precision and recall at this n and of their differences from the floor (the mean
over repeats); KID and its difference, unbiased, have the population MMD^2 as target (0 for the floor, the mean over
repeats otherwise). With `--issue`, first the single draw of the issue (n = 1,000, d = 128, one Gaussian): the
point FD, the old basic and percentile bootstrap intervals (with replacement) and the half-split interval.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import torch

from synthgap_helpers.gap.measures import frechet_distances, gap_intervals, gap_table

MEASURES = ("fd", "kid", "precision", "recall")


def gaussian(n: int, dim: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """n float64 rows of N(shift, I_dim)."""
    return torch.randn(n, dim, generator=generator, dtype=torch.float64) + shift


def issue_example(resamples: int) -> None:
    """The issue's draw: two samples of one Gaussian, n = 1,000, d = 128 (true FD 0)."""
    generator = torch.Generator().manual_seed(0)
    real, fake = gaussian(1000, 128, 0.0, generator), gaussian(1000, 128, 0.0, generator)
    rows = torch.randint(1000, (2, resamples, 1000), generator=generator)
    boot = torch.cat([frechet_distances(real, fake, rows[0, i: i + 25], rows[1, i: i + 25])
                      for i in range(0, resamples, 25)]).numpy()
    value, low, high = gap_intervals(real, fake, n_splits=resamples)["fd"]
    q_low, q_high = np.quantile(boot, [0.025, 0.975])
    print(f"issue draw (n=1000, d=128, one Gaussian): FD {value:.2f}; old basic [{2 * value - q_high:.2f}, "
          f"{2 * value - q_low:.2f}], old percentile [{q_low:.2f}, {q_high:.2f}] ({resamples} resamples); "
          f"half-split [{low:.2f}, {high:.2f}] ({resamples} splits)")


def coverage(dim: int, n: int, shift: float, repeats: int, splits: int, kid_subset_size: int) -> pd.Series:
    """Share of `repeats` whose interval holds the target, per measure and difference, for a set shifted by `shift`."""
    generator = torch.Generator().manual_seed(1)
    tables = []
    for repeat in range(repeats):
        sets = {"real": gaussian(n, dim, 0.0, generator), "floor": gaussian(n, dim, 0.0, generator),
                "set": gaussian(n, dim, shift, generator)}
        tables.append(gap_table(sets, "real", "floor", kid_subsets=10, kid_subset_size=kid_subset_size,
                                n_splits=splits, seed=repeat, progress=False).set_index("set"))
    frame = pd.concat(tables, keys=range(repeats), names=["repeat"])
    held = {}
    for measure in MEASURES:
        for row, column in (("floor", measure), ("set", measure), ("set", f"{measure}_diff")):
            values = frame.xs(row, level="set")
            exact_zero = measure == "kid" and (row == "floor" or shift == 0)
            target = 0.0 if exact_zero else values[column].mean()
            inside = (values[f"{column}_low"] <= target) & (target <= values[f"{column}_high"])
            held[f"{row} {column}"] = inside.mean()
    return pd.Series(held, name=f"shift {shift}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--splits", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=20)
    parser.add_argument("--shift", type=float, nargs="+", default=[0.0, 0.15])
    parser.add_argument("--issue", action="store_true", help="first the issue's n = 1,000, d = 128 draw")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.issue:
        issue_example(args.splits)
    table = pd.concat([coverage(args.dim, args.n, shift, args.repeats, args.splits, args.kid_subset_size)
                       for shift in args.shift], axis=1)
    print(f"coverage of nominal 95% intervals, d={args.dim}, n={args.n}, {args.repeats} repeats, {args.splits} "
          f"half-splits, KID on {args.n // args.kid_subset_size} subsets of {args.kid_subset_size}:")
    print(table.round(3).to_string())


if __name__ == "__main__":
    main()
