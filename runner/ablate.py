"""`runner ablate --tag T`: which keeps of a night still matter on its final best.

Each kept change is reverted alone on the final best: its train.py diff (parent -> keep), applied
in reverse with a three-way merge. One that no longer applies cleanly is entangled with later
keeps and listed as such, not run. The final best and every ablation run with the same seeds
(offsets 0..n-1, the runner's hook), verified when verification is on, and a keep is worth what
reverting it costs: the mean of the ablation's runs less the mean of the best's. A keep whose
revert costs no more than the noise (the larger of min_delta and the spread the best's own runs
or the tag's noise floor show) could be dropped.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .ledger import Ledger
from .records import RowStatus, VerificationUnavailable
from .reruns import load_noise
from .summary import STATUS_OK, VERDICT_OK
from .text import one_line

if TYPE_CHECKING:
    from .engine import Engine
    from .repo import ResearchRepo

ABLATION_FILE = "ablation.json"


class AblateError(ValueError):
    """Nothing to ablate, or the tag's ledger does not say what was kept."""


class Worth(StrEnum):
    """What reverting a keep on the final best says of it."""

    HELPS = "helps"          # reverting it costs more than the noise
    DROPPABLE = "droppable"  # reverting it costs no more than the noise
    ENTANGLED = "entangled"  # its change no longer reverts cleanly on the best: not run
    FAILED = "failed"        # a run of the ablation crashed or did not verify


@dataclass(frozen=True)
class Ablation:
    iteration: int
    commit: str                    # the keep
    description: str
    values: tuple[float, ...] = ()  # val_bpb of the ablation's runs (one per seed); empty = not run
    delta: float | None = None     # mean(ablation) - mean(best): what the keep is worth now (> 0 helps)
    verdict: Worth | None = None


@dataclass(frozen=True)
class AblationReport:
    tag: str
    best: str
    best_values: tuple[float, ...]
    noise: float                   # the bar a keep's worth must clear to count as helping
    ablations: tuple[Ablation, ...]

    def lines(self) -> list[str]:
        out = [f"ablation of {self.tag} on {self.best[:7]}: best val_bpb {statistics.fmean(self.best_values):.6f} "
               f"over seeds {list(range(len(self.best_values)))}; noise {self.noise:.6f}",
               f"{'iter':>4} {'commit':8} {'verdict':10} {'worth':>10}  keep"]
        for a in self.ablations:
            worth = "-" if a.delta is None else f"{a.delta:+.6f}"
            commit, description = one_line(a.commit[:7]), one_line(a.description)  # the ledger's text, sanitised
            out.append(f"{a.iteration:>4} {commit:8} {a.verdict or '-':10} {worth:>10}  {description}")
        return out


def ablation_path(ledger: Ledger) -> Path:
    return ledger.dir / ABLATION_FILE


def load(ledger: Ledger) -> dict | None:
    try:
        return json.loads(ablation_path(ledger).read_text())
    except (OSError, ValueError):
        return None


def ablate(engine: Engine, repo: ResearchRepo, ledger: Ledger, seeds: int, min_delta: float,
           progress: Callable[[str], None] = print) -> AblationReport:
    """Run the ablations of `ledger`'s tag and save them beside its events (ablation.json).

    Raises:
        AblateError: the tag has no keep beyond its baseline.
    """
    experiments = ledger.experiments()
    keeps = [e for e in experiments if e.status == RowStatus.KEEP]
    if len(keeps) < 2:
        raise AblateError(f"tag {ledger.tag} has no keep beyond its baseline: nothing to ablate")
    best = keeps[-1].commit
    tag = ledger.tag
    best_values = _values(engine, tag, best, seeds, ledger, "best", progress)
    if len(best_values) < seeds:
        raise AblateError(f"the final best {best[:7]} did not run cleanly with every seed: read {ledger.runs_dir}")
    spread = max(best_values) - min(best_values)
    noise_file = load_noise(ledger)
    floor = noise_file.get("spread", 0.0) if isinstance(noise_file, dict) else 0.0
    noise = max(min_delta, spread, floor if isinstance(floor, (int, float)) else 0.0)
    reference = statistics.fmean(best_values)
    ablations = []
    for i, keep in enumerate(keeps[1:], 1):
        parent = keep.parent or keeps[i - 1].commit
        reverted = repo.merge_train_py(keep.commit, best, parent)  # the change keep -> parent, on the best
        if reverted is None:
            ablations.append(Ablation(keep.iteration, keep.commit, keep.row.description, verdict=Worth.ENTANGLED))
            continue
        ablated = repo.commit_train_py(best, reverted, f"{tag}: ablate {keep.row.description}",
                                       ref=f"refs/autoresearch/{tag}/ablate-{keep.iteration}").sha
        values = _values(engine, tag, ablated, seeds, ledger, f"ablate-{keep.iteration}", progress)
        if len(values) < seeds:
            ablations.append(Ablation(keep.iteration, keep.commit, keep.row.description, tuple(values), verdict=Worth.FAILED))
            continue
        delta = statistics.fmean(values) - reference
        ablations.append(Ablation(keep.iteration, keep.commit, keep.row.description, tuple(values), round(delta, 6),
                                  Worth.HELPS if delta > noise else Worth.DROPPABLE))
    report = AblationReport(tag, best, tuple(best_values), noise, tuple(ablations))
    path = ablation_path(ledger)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(report), indent=2))
    tmp.replace(path)
    return report


def _values(engine: Engine, tag: str, commit: str, seeds: int, ledger: Ledger, name: str,
            progress: Callable[[str], None]) -> list[float]:
    """val_bpb of `commit` under seed offsets 0..seeds-1 (verified when the night's keeps were);
    a run that crashed or did not verify gives none."""
    # verified as the night's keeps were (auto falls back for good when the baseline could not be)
    verify = engine.cfg.verify != "off" and ledger.last(VerificationUnavailable) is None
    values = []
    for seed in range(seeds):
        log = ledger.dir / "ablation" / f"{name}-{commit[:7]}-seed{seed}.log"
        run = engine.run_commit(commit, tag, log, seed=seed, export=verify)
        if verify:
            run = engine.verify(run, tag)
        ok = run.outcome.status == STATUS_OK and run.outcome.verdict in (None, VERDICT_OK)
        progress(f"{name} {commit[:7]} seed {seed}: " + (f"val_bpb {run.outcome.val_bpb:.6f}" if ok else
                                                         f"{run.outcome.status} {run.outcome.reason or run.outcome.verdict or ''}"))
        if ok:
            values.append(run.outcome.val_bpb)
    return values
