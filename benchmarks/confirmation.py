"""How many false keeps confirmation removes, and what it costs in runs: a simulated night with a
known noise level, decided by the runner's own rule (runner.policy: decide, confirm).

Each proposal has a true effect on val_bpb (most do nothing or hurt a little, a few help); every
run measures the true value plus Gaussian seed noise. Three rules run side by side on the same
proposals and the same noise draws:

  one run     autoresearch's rule: keep if the run beats the best (min_delta 0)
  one run+    one run against min_delta auto (2 x the spread of the baseline's 3 seeded runs)
  confirmed0  the runner's default: min_delta 0, and a would-be keep runs again with another
              seed and is kept on the mean of its runs
  confirmed   the same confirmation against min_delta auto

A false keep is a keep whose true value is not better than the best's true value.

    python benchmarks/confirmation.py [--nights 200] [--experiments 100] [--noise 0.01]
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

from runner.policy import RunState, confirm, decide
from runner.summary import Metrics, Outcome


@dataclass
class _Job:
    parent: str
    retry_fix: bool = False


def _ok(value: float) -> Outcome:
    return Outcome("ok", "", Metrics(val_bpb=value))


def night(rng: random.Random, experiments: int, noise: float, rule: str) -> tuple[int, int, int, float]:
    """(true keeps, false keeps, runs, final true val_bpb) of one simulated night."""
    true_best = 4.0
    measure = lambda true: true + rng.gauss(0.0, noise)  # noqa: E731
    baseline = [measure(true_best) for _ in range(3)]
    min_delta = 0.0 if rule in ("one run", "confirmed0") else 2 * (max(baseline) - min(baseline))
    state = RunState(best_commit="best", best_val_bpb=baseline[0])
    good = bad = runs = 0
    for _ in range(experiments):
        # most ideas do nothing or hurt a little; one in six helps by about the noise level
        effect = rng.gauss(-1.0 * noise, 0.8 * noise) if rng.random() < 1 / 6 else rng.gauss(0.5 * noise, noise)
        true = true_best + effect
        values = [measure(true)]
        runs += 1
        decision = decide(state, _Job("best"), _ok(values[0]), min_delta)
        if decision.status == "keep" and rule.startswith("confirmed"):
            values.append(measure(true))
            runs += 1
            decision = decide(state, _Job("best"), _ok(confirm(values, baseline).mean), min_delta)
        if decision.status == "keep":
            if true < true_best:
                good += 1
            else:
                bad += 1
            true_best = true
            state.best_val_bpb = sum(values) / len(values)
    return good, bad, runs, true_best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nights", type=int, default=200)
    ap.add_argument("--experiments", type=int, default=100)
    ap.add_argument("--noise", type=float, default=0.01, help="stdev of val_bpb over seeds")
    args = ap.parse_args()
    print(f"{args.nights} simulated nights x {args.experiments} experiments, seed noise stdev {args.noise}")
    print(f"{'rule':10} {'true keeps':>10} {'false keeps':>11} {'false %':>8} {'runs':>7} {'final gain':>10}")
    rows = {}
    for rule in ("one run", "one run+", "confirmed0", "confirmed"):
        rng = random.Random(1234)  # the same proposals and noise draws for every rule
        totals = [0, 0, 0, 0.0]
        for _ in range(args.nights):
            good, bad, runs, final = night(rng, args.experiments, args.noise, rule)
            totals[0] += good
            totals[1] += bad
            totals[2] += runs
            totals[3] += 4.0 - final
        rows[rule] = totals
        good, bad, runs, gain = totals
        print(f"{rule:10} {good / args.nights:>10.2f} {bad / args.nights:>11.2f} {100 * bad / max(good + bad, 1):>7.1f}% "
              f"{runs / args.nights:>7.1f} {gain / args.nights:>10.5f}")
    base = rows["one run"]
    for rule in ("confirmed0", "confirmed"):
        ours = rows[rule]
        print(f"{rule} vs one run: false keeps x{ours[1] / max(base[1], 1):.2f}, runs x{ours[2] / base[2]:.2f}, "
              f"true improvement per night x{ours[3] / base[3] if base[3] else float('nan'):.2f}")


if __name__ == "__main__":
    main()
