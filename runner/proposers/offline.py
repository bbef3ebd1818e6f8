"""A local search over train.py's top-level numeric hyperparameters: one change per
experiment, found with `ast`, seeded and reproducible. No key, no network; a real baseline
to hold an LLM proposer against.
"""

from __future__ import annotations

import ast
import random
import re
from dataclasses import dataclass

from .base import Context, Proposal, Proposer, ProposerError, Summary, trajectory_from_rows

NORMAL_FACTORS = (0.5, 0.75, 1.25, 1.5, 2.0)
WIDE_FACTORS = (0.25, 0.33, 3.0, 4.0)
_DESC = re.compile(r"^(?P<name>[A-Z_][A-Z0-9_]*) (?P<old>\S+) -> (?P<new>\S+)")


@dataclass(frozen=True)
class Knob:
    name: str
    value: int | float
    line: int          # 1-based
    col: int
    end_col: int


def find_knobs(source: str) -> list[Knob]:
    """Top-level `NAME = <number>` assignments (UPPER_CASE names, numbers not bools)."""
    knobs = []
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        name, value = node.targets[0].id, node.value
        if not name.isupper() or not isinstance(value, ast.Constant):
            continue
        if isinstance(value.value, bool) or not isinstance(value.value, (int, float)):
            continue
        if value.lineno != value.end_lineno:
            continue
        knobs.append(Knob(name, value.value, value.lineno, value.col_offset, value.end_col_offset))
    return knobs


def set_knob(source: str, knob: Knob, new_value: int | float) -> str:
    """`source` with the literal of `knob` replaced, comments and layout untouched."""
    lines = source.splitlines(keepends=True)
    line = lines[knob.line - 1]
    lines[knob.line - 1] = line[: knob.col] + _literal(new_value) + line[knob.end_col:]
    return "".join(lines)


def _literal(value: int | float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.6g}" if "e" in f"{value:.6g}" or "." in f"{value:.6g}" else f"{value:.6g}.0"


def mutate(knob: Knob, rng: random.Random, wide: bool) -> int | float:
    """A new value for `knob`: scaled by a factor; integers stay integers >= 1; fractions stay in [0, 1)."""
    factor = rng.choice(WIDE_FACTORS if wide else NORMAL_FACTORS)
    v = knob.value
    if isinstance(v, int):
        if v <= 4:
            step = rng.choice((-2, -1, 1, 2) if wide else (-1, 1))
            return max(1, v + step) if v + step != v else v + 1
        return max(1, int(round(v * factor)))
    new = v * factor if v != 0 else rng.choice((0.01, 0.05, 0.1))
    if 0.0 <= v < 1.0 and ("FRAC" in knob.name or "DROPOUT" in knob.name or "BETA" in knob.name):
        new = min(new, 0.999)
    return float(f"{new:.4g}")


class OfflineProposer(Proposer):
    name = "offline"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def _tried(self, ctx: Context) -> set[tuple[str, str]]:
        tried = set()
        for line in ctx.results_tail.splitlines()[1:]:
            parts = line.split("\t")
            if len(parts) == 5 and (m := _DESC.match(parts[4])):
                tried.add((m["name"], m["new"]))
        return tried

    def propose(self, ctx: Context) -> Proposal:
        knobs = find_knobs(ctx.train_py)
        if not knobs:
            raise ProposerError("train.py has no top-level numeric constants to tune")
        # Seeded by (seed, iteration): a resumed run proposes what the uninterrupted one would.
        rng = random.Random(f"{self.seed}:{ctx.iteration}")
        tried = self._tried(ctx)
        for _ in range(50):
            knob = rng.choice(knobs)
            new = mutate(knob, rng, ctx.widen)
            if new != knob.value and (knob.name, _literal(new)) not in tried:
                break
        else:
            raise ProposerError("every nearby value has been tried; widen the search space in train.py")
        direction = "larger" if new > knob.value else "smaller"
        return Proposal(
            train_py=set_knob(ctx.train_py, knob, new),
            description=f"{knob.name} {_literal(knob.value)} -> {_literal(new)}",
            hypothesis=f"a {direction} {knob.name} lowers val_bpb within the same time budget",
        )

    def summarize(self, ctx: Context, rows: list) -> Summary:
        trajectory = trajectory_from_rows(rows)
        trajectory[-1] += f" (offline search, seed {self.seed})"
        tried_names = {m["name"] for r in rows if (m := _DESC.match(r.description))}
        untried = [k.name for k in find_knobs(ctx.train_py) if k.name not in tried_names]
        ideas = [f"try {name} (not varied yet)" for name in untried[:3]]
        helped = [r.description.split()[0] for r in rows if r.status == "keep" and _DESC.match(r.description)]
        ideas += [f"push {name} further in the direction that helped" for name in dict.fromkeys(reversed(helped))]
        ideas += ["combine the kept changes with a longer budget", "rerun the best commit to measure noise"]
        return Summary(trajectory=trajectory, next_ideas=ideas[:3])
