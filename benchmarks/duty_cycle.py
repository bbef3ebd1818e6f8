"""The runner's duty cycle against bare processes: the same experiments (a fixed list of train.py
edits, after the baseline) run (a) as bare processes one after another, as autoresearch runs
them, and (b) through the runner's research loop, side by side in one invocation.

(a) bare: `python train.py > run.log 2>&1` in a checkout of the bundled tinylm example, on the
    host, with the prepared data and the same budget (AUTORESEARCH_TIME_BUDGET), an edit
    committed before each run and reset after a discard, as autoresearch's program.md says.
(b) runner: the loop `runner start` runs (runner.loop.Loop, the real Engine on the Docker
    daemon: an image per commit, the hardened container, verification as configured, the
    ledger), built in-process with a proposer that replays the same edit list (the offline
    proposer cannot be told which edits to make). Noise-floor reruns and confirmation runs are
    off: they are runs bare autoresearch never makes, and each side runs the same N + 1.

Both sides run on the CPU (a GPU host's devices are hidden from the bare runs and not leased
to the loop), on the same CPUs (no cpuset or quota unless runner.yaml's limits set one). Prints each side's duty cycle (training
seconds / wall seconds, runner.policy.duty_cycle; the runner's is its summary event's), their
ratio, experiments per hour (the baseline counted as one), and where each side's wall time went:
training, python start-up, evaluation and the rest of train.py, from the runs' own summaries
(bare) and the events.jsonl run records (runner; with verification, evaluate_bpb also exports the
model); image builds and verification timed around the engine's calls, which the run records do
not time; proposer wait; the rest is the runner's own.

    python benchmarks/duty_cycle.py [--experiments 3] [--budget 60] [--verify auto|on|off]
                                    [--out figures.json] [--work DIR]

Needs the Docker daemon, the base image (`runner base-image build`) and torch on the host for
the bare runs (`pip install -e '.[bench]'`). Takes about 2 x (experiments + 1) x (budget + 10 s),
plus 15-30 s per verified run (the baseline and each would-be keep) on a 2-core host;
`--budget 5 --experiments 1` is a two-minute smoke test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runner.policy import duty_cycle
from runner.proposers.base import Context, Proposal, Proposer, ProposerError, Summary, trajectory_from_rows
from runner.proposers.offline import find_knobs, set_knob
from runner.summary import parse_summary

GOAL_RATIO = 0.97          # the runner's duty cycle over bare's that issue 22 asks for (CPU host, 60 s budget)
SECONDS_PER_HOUR = 3600
# One change per experiment, each to a knob that leaves the cost of a training step as it is:
# both sides then train for the same budget and evaluate the same model size.
EDITS = (
    ("LEARNING_RATE", 0.004),
    ("WARMUP_FRAC", 0.1),
    ("WEIGHT_DECAY", 0.05),
    ("BETA2", 0.95),
    ("FINAL_LR_FRAC", 0.05),
    ("GRAD_CLIP", 0.5),
)
LR_STEP = 0.9              # past EDITS: LEARNING_RATE x LR_STEP**k, every k a train.py of its own

# (key, label) of the phases each side's wall time is split into, in the order they are printed.
PHASES = (
    ("setup", "setup (trainer image, sweep, branch)"),
    ("image_build", "experiment image builds"),
    ("container", "container create/start/remove, judging"),
    ("startup", "python start, imports, exit"),
    ("training", "training (training_seconds)"),
    ("evaluation", "evaluation (+ model export), the rest"),
    ("verification", "verification"),
    ("proposer", "proposer wait"),
    ("other", "the rest (edits, git, ledger, decisions)"),
)
LABEL_WIDTH = 42           # characters of the table's first column
CELL_WIDTH = 16            # characters of each side's column


def edit_list(baseline: str, n: int) -> list[tuple[str, str]]:
    """`n` experiments, each (train.py, description): one knob of `baseline` changed, every
    train.py different from the baseline and from each other."""
    knobs = {k.name: k for k in find_knobs(baseline)}
    edits = []
    for i in range(n):
        if i < len(EDITS):
            name, value = EDITS[i]
        else:
            name = "LEARNING_RATE"
            value = float(f"{knobs[name].value * LR_STEP ** (i - len(EDITS) + 1):.6g}")
        edits.append((set_knob(baseline, knobs[name], value), f"{name} {knobs[name].value} -> {value}"))
    return edits


@dataclass
class Side:
    """One side's figures: its runs (the baseline included), wall and training seconds, and the
    wall split into PHASES (seconds; a phase the side does not have is absent)."""

    runs: int = 0
    wall_s: float = 0.0
    training_s: float = 0.0
    duty_cycle: float = 0.0
    experiments_per_hour: float = 0.0
    statuses: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    verify: str = ""              # the loop's verification as it ended (auto: off when the baseline could not be verified)
    verify_unavailable: str = ""  # why it fell back, as the loop recorded it

    def close(self) -> "Side":
        """Fill the derived figures; the phases' remainder becomes `other`."""
        self.duty_cycle = duty_cycle(self.training_s, self.wall_s) or 0.0
        self.experiments_per_hour = self.runs / self.wall_s * SECONDS_PER_HOUR if self.wall_s else 0.0
        self.phases["other"] = self.wall_s - sum(v for k, v in self.phases.items() if k != "other")
        return self


# --- (a) bare --------------------------------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def run_bare(repo: Path, home: Path, budget_s: float, edits: list[tuple[str, str]], say) -> Side:
    """The baseline, then each edit: committed, run as `python train.py > run.log 2>&1`, kept if
    its val_bpb is lower than the best, else reset (autoresearch's program.md)."""
    env = {**os.environ, "HOME": str(home), "AUTORESEARCH_TIME_BUDGET": f"{budget_s:g}",
           "CUDA_VISIBLE_DEVICES": ""}  # the loop's runs get no GPU here either
    side, best = Side(), float("inf")
    phases = dict.fromkeys(("startup", "training", "evaluation", "proposer"), 0.0)
    log = repo / "run.log"
    t0 = time.monotonic()
    for i, (train_py, description) in enumerate([(None, "baseline"), *edits]):
        if train_py is not None:
            (repo / "train.py").write_text(train_py)
            git(repo, "commit", "-qam", description)
        started = time.monotonic()
        with open(log, "wb") as out:
            code = subprocess.run([sys.executable, "train.py"], cwd=repo, env=env, stdout=out,
                                  stderr=subprocess.STDOUT).returncode
        wall_s = time.monotonic() - started
        metrics = parse_summary(log.read_text(errors="replace")) if code == 0 else None
        training_s = (metrics.training_seconds or 0.0) if metrics else 0.0
        total_s = (metrics.total_seconds or 0.0) if metrics else 0.0
        side.training_s += training_s
        phases["training"] += training_s
        phases["evaluation"] += max(total_s - training_s, 0.0)
        phases["startup"] += wall_s - total_s
        if metrics and metrics.val_bpb < best:
            status, best = "keep", metrics.val_bpb
        else:
            status = "discard" if metrics else "crash"
            git(repo, "reset", "-q", "--hard", "HEAD~1")
        with open(repo / "results.tsv", "a") as f:
            f.write(f"{git(repo, 'rev-parse', '--short=7', 'HEAD').strip()}\t"
                    f"{metrics.val_bpb if metrics else 0.0:.6f}\t{status}\t{description}\n")
        side.statuses.append(status)
        say(f"  bare {i}: {description}: {status}, val_bpb {metrics.val_bpb if metrics else float('nan'):.6f}, "
            f"{wall_s:.1f} s ({training_s:.1f} s training)")
    side.runs, side.wall_s, side.phases = len(edits) + 1, time.monotonic() - t0, phases
    return side.close()


# --- (b) the runner's loop -------------------------------------------------------------------


class ReplayProposer(Proposer):
    """Proposes the fixed edit list in order (each a whole train.py), and counts the seconds it
    took (the loop waits for them: they are the night's proposer wait)."""

    name = "replay"

    def __init__(self, edits: list[tuple[str, str]]):
        self.edits = list(edits)
        self.wait_s = 0.0

    def propose(self, ctx: Context) -> Proposal:
        t0 = time.monotonic()
        try:
            if not self.edits:
                raise ProposerError("the benchmark's edit list is used up")
            train_py, description = self.edits.pop(0)
            return Proposal(train_py, description, "replayed from benchmarks/duty_cycle.py's edit list")
        finally:
            self.wait_s += time.monotonic() - t0

    def summarize(self, ctx: Context, rows: list) -> Summary:
        return Summary(trajectory_from_rows(rows), [])


class EngineClock:
    """Seconds the loop spent in the engine calls its run records do not time: image builds
    (those made inside run_commit, the baseline's, are inside the record's overhead_s and
    counted apart) and verification, whole (the record's verify_s is its container only)."""

    def __init__(self, engine):
        self.build_s = self.build_in_run_s = self.verify_s = 0.0
        self._in_run = threading.local()
        build, run, verify = engine.experiment_image, engine.run_commit, engine.verify

        def timed_build(*args, **kwargs):
            t0 = time.monotonic()
            try:
                return build(*args, **kwargs)
            finally:
                seconds = time.monotonic() - t0
                self.build_s += seconds
                if getattr(self._in_run, "on", False):
                    self.build_in_run_s += seconds

        def timed_run(*args, **kwargs):
            self._in_run.on = True
            try:
                return run(*args, **kwargs)
            finally:
                self._in_run.on = False

        def timed_verify(*args, **kwargs):
            t0 = time.monotonic()
            try:
                return verify(*args, **kwargs)
            finally:
                self.verify_s += time.monotonic() - t0

        # Instance attributes: run_commit reaches the build through self.experiment_image too.
        engine.experiment_image, engine.run_commit, engine.verify = timed_build, timed_run, timed_verify


def run_loop(repo_path: Path, overrides: dict, edits: list[tuple[str, str]], say) -> tuple[Side, str]:
    """The baseline and the edits through the loop `runner start` runs; (figures, events.jsonl path)."""
    from runner.config import load_config
    from runner.engine import Engine, cpuset_cpus, fit_to_host, make_slots
    from runner.loop import Loop
    from runner.records import SessionSummary, Start, VerificationUnavailable
    from runner.repo import ResearchRepo

    cfg = load_config(repo_path, {**overrides, "max_experiments": len(edits), "confirm": "off", "noise_runs": 0})
    research = ResearchRepo(repo_path)
    slots = make_slots((), cfg.workers, cpuset_cpus(cfg.limits.cpuset))  # no GPU lease: the CPU, as bare
    cfg, fitted = fit_to_host(cfg, len(slots))
    if fitted:
        say(f"  runner: {fitted}")
    with Engine(cfg, research, progress=lambda m: say(f"  runner: {m}")) as engine:
        clock = EngineClock(engine)
        proposer = ReplayProposer(edits)
        loop = Loop(cfg, research, engine, proposer, out=lambda line: say(f"  runner: {line}"))
        started = time.time()
        loop.run(slots=slots)
    summary, start = loop.ledger.last(SessionSummary), loop.ledger.last(Start)
    experiments = loop.ledger.experiments()
    total = [(e.metrics.total_seconds if e.metrics else None) or 0.0 for e in experiments]  # train.py's own clock
    side = Side(runs=len(experiments), wall_s=summary.wall_s, training_s=summary.training_s,
                statuses=[str(e.status) for e in experiments], verify=loop.verify_mode,
                verify_unavailable="; ".join(e.why for e in loop.ledger.events(VerificationUnavailable)))
    side.phases = {
        "setup": start.ts - started,
        "image_build": clock.build_s,
        # the record's total_s - wall_s: the runner's time around the container (the baseline's build included)
        "container": sum(e.run.overhead_s for e in experiments) - clock.build_in_run_s,
        "startup": sum(e.run.wall_s - t for e, t in zip(experiments, total)),
        "training": sum(e.training_s for e in experiments),
        "evaluation": sum(max(t - e.training_s, 0.0) for e, t in zip(experiments, total)),
        "verification": clock.verify_s,
        "proposer": proposer.wait_s,
    }
    side.close()
    side.duty_cycle = summary.duty_cycle  # the loop's own figure (policy.duty_cycle), as its summary says it
    return side, str(loop.ledger.events_path)


def remove_images(repo_path: Path, overrides: dict, tag: str) -> None:
    """Remove the experiment images of this invocation's tag (no one else's: the tag is its own)."""
    from runner.config import load_config
    from runner.engine import Engine
    from runner.repo import ResearchRepo
    from sandbox import naming

    cfg = load_config(repo_path, overrides)
    with Engine(cfg, ResearchRepo(repo_path), progress=lambda m: None) as engine:
        for image in engine.store.images(naming.KIND_EXPERIMENT, **{naming.L_TAG: tag}):
            engine.store.remove_image(image.ref)


# --- the comparison --------------------------------------------------------------------------


def report(bare: Side, ours: Side, args, say) -> dict:
    """Print the comparison; returns the figures (--out's JSON)."""
    ratio = ours.duty_cycle / bare.duty_cycle if bare.duty_cycle else float("nan")
    asked = args.verify or "runner.yaml's"
    say("")
    say(f"{args.experiments} experiment(s) after a baseline on each side, budget {args.budget:g} s, "
        f"runner verify {asked} -> {ours.verify}" + (f" ({ours.verify_unavailable})" if ours.verify_unavailable else ""))
    say(f"{'':{LABEL_WIDTH}}{'bare':>{CELL_WIDTH}}{'runner':>{CELL_WIDTH}}")
    for label, key, fmt in (("runs (baseline included)", "runs", "d"), ("wall s", "wall_s", ".1f"),
                            ("training s", "training_s", ".1f"), ("duty cycle (training s / wall s)", "duty_cycle", ".4f"),
                            ("experiments per hour", "experiments_per_hour", ".1f")):
        say(f"{label:{LABEL_WIDTH}}{getattr(bare, key):>{CELL_WIDTH}{fmt}}{getattr(ours, key):>{CELL_WIDTH}{fmt}}")
    statuses = [" ".join(s[0] for s in side.statuses) for side in (bare, ours)]  # k(eep) d(iscard) c(rash)
    say(f"{'statuses (keep, discard, crash)':{LABEL_WIDTH}}{statuses[0]:>{CELL_WIDTH}}{statuses[1]:>{CELL_WIDTH}}")
    say("")
    say(f"{'where the wall went: s, % of wall':{LABEL_WIDTH}}{'bare':>{CELL_WIDTH}}{'runner':>{CELL_WIDTH}}")
    for key, label in PHASES:
        cells = [side.phases.get(key) for side in (bare, ours)]
        cells = ["-" if v is None else f"{v:.1f} {100 * v / side.wall_s:5.1f}%" for v, side in zip(cells, (bare, ours))]
        say(f"{label:{LABEL_WIDTH}}{cells[0]:>{CELL_WIDTH}}{cells[1]:>{CELL_WIDTH}}")
    say("")
    say(f"runner / bare duty cycle: {ratio:.3f} (goal >= {GOAL_RATIO}: {'met' if ratio >= GOAL_RATIO else 'missed'}); "
        f"runner wall - bare wall: {ours.wall_s - bare.wall_s:+.1f} s, "
        f"{(ours.wall_s - bare.wall_s) / max(ours.runs, 1):+.1f} s per run")
    return {"experiments": args.experiments, "budget_s": args.budget, "verify": args.verify, "bare": asdict(bare),
            "runner": asdict(ours), "ratio": ratio, "goal_ratio": GOAL_RATIO, "goal_met": ratio >= GOAL_RATIO}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", type=int, default=3, help="experiments after the baseline, on each side")
    ap.add_argument("--budget", type=float, default=60, help="training budget per run, seconds")
    ap.add_argument("--verify", choices=("auto", "on", "off"), help="the loop's verification (default: runner.yaml's)")
    ap.add_argument("--out", type=Path, help="write the figures here as JSON")
    ap.add_argument("--work", type=Path, help="an empty folder for the repos, data and logs (default: a new temp folder)")
    args = ap.parse_args()
    if args.experiments < 1 or args.budget <= 0:
        sys.exit("--experiments must be 1 or more and --budget positive")
    if importlib.util.find_spec("torch") is None:
        sys.exit(f"the bare runs need torch in this python ({sys.executable}): pip install -e '.[bench]'")
    say = lambda line: print(line, flush=True)  # noqa: E731

    work = (args.work or Path(tempfile.mkdtemp(prefix="ar-duty-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data, heldout, home = work / "data", work / "heldout", work / "home"
    tag = f"duty-{int(time.time())}"
    say(f"work folder {work} (repos, data, logs); runner tag {tag}")
    # The held-out copy goes into this work folder, not the user's verify_data.
    env = {**os.environ, "AUTORESEARCH_HELDOUT_DIR": str(heldout)}
    cli = [sys.executable, "-m", "runner"]
    repo, bare_repo = work / "tinylm", work / "bare"
    t0 = time.monotonic()
    for cmd in (("init-example", str(repo)), ("init-example", str(bare_repo)),
                ("prepare", "--repo", str(repo), "--data-dir", str(data))):
        r = subprocess.run([*cli, *cmd], env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"runner {' '.join(cmd)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    # The bare runs find the same data where prepare.py looks for it: ~/.cache/autoresearch.
    (home / ".cache").mkdir(parents=True, exist_ok=True)
    (home / ".cache" / "autoresearch").symlink_to(data)
    edits = edit_list((repo / "train.py").read_text(), args.experiments)
    say(f"two checkouts of tinylm and its data prepared in {time.monotonic() - t0:.0f} s")
    overrides = {"tag": tag, "data_dir": data, "verify_data": heldout, "budget_s": args.budget, "verify": args.verify}

    say("(a) bare processes")
    bare = run_bare(bare_repo, home, args.budget, edits, say)
    say("(b) the runner's loop")
    try:
        ours, events = run_loop(repo, overrides, edits, say)
    finally:
        remove_images(repo, overrides, tag)
    say(f"  runner: events in {events}")
    figures = report(bare, ours, args, say)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
