"""The `runner` command: options in, the config built, then the work of `runner/` called; only
the printing of results is decided here.

Every expected failure (bad input, no daemon, missing image or data) ends as one `error:` line
on stderr that says what to do, and exit code 2.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .ledger import RunnerFiles
from .text import block, one_line

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Safe unattended ML research loops in containers.")
base_app = typer.Typer(no_args_is_help=True, help="The registry-less base image.")
app.add_typer(base_app, name="base-image")
agent_app = typer.Typer(no_args_is_help=True, help="The runner's own image, for running it in a container.")
app.add_typer(agent_app, name="agent-image")

RepoOpt = typer.Option(Path("."), "--repo", help="The research repo (prepare.py, train.py, program.md).")
REPORT_LINE_MAX_CHARS = 2000  # a line of `runner report`'s figures


def _expected_errors() -> tuple[type[BaseException], ...]:
    from sandbox.backend import SandboxError
    from sandbox.fsafe import UnsafePathError
    from sandbox.gpu import GpuError
    from sandbox.naming import TagError

    from .ablate import AblateError
    from .config import ConfigError
    from .data import DataError
    from .ledger import LedgerError
    from .loop import LoopError
    from .proposers.base import ProposerError
    from .repo import RepoError

    return (SandboxError, GpuError, TagError, ConfigError, DataError, LedgerError, LoopError, RepoError, ProposerError,
            UnsafePathError, AblateError)


def cli_command(fn):
    """Turn the expected failures of `fn` into one clear error line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _expected_errors() as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)

    return wrapper


def _config(repo: Path, **overrides):
    from .config import load_config

    return load_config(repo, overrides)


def _open_repo(path: Path):
    from .repo import ResearchRepo

    return ResearchRepo(path)


@contextlib.contextmanager
def _leased(request: str):
    """GPUs leased for the `with` block (see _lease), released after it."""
    lease = _lease(request)
    try:
        yield lease
    finally:
        lease.release()


def _lease(request: str):
    """Lease GPUs: free by lock file and not held by any running experiment container. Runs on
    the CPU are never silent: the reason is printed.

    Raises:
        GpuError: see gpu.acquire; or this runner is in a container that was given no GPU on
            an engine that has them (the nvidia runtime).
    """
    from sandbox import gpu
    from sandbox.backend import held_gpus

    if gpu.parse_request(request)[0] == "none":
        return gpu.GpuLease.none("--gpus none", expected=True)
    with _backend() as backend:  # GPUs of this host: its engine's runs hold them
        lease = gpu.acquire(request, busy=held_gpus(backend.executor))
        in_container_with_toolkit = (backend.executor.owner.startswith("container:")
                                     and backend.executor.gpu_runtime("auto") == "toolkit")
    if not lease.devices:
        if in_container_with_toolkit:
            raise gpu.GpuError(f"this runner's container sees no GPU ({lease.cpu_reason}) on an engine with the nvidia "
                               "runtime: run it with --gpus all --pid host (see the README), or pass --gpus none to run on the CPU")
        if not lease.cpu_expected:
            # NVML is there and sees no GPU, or fails without the driver's nodes: said, never silent
            # (a host without the NVIDIA library at all is a CPU host, nothing to say about it)
            typer.echo(f"no GPU leased ({lease.cpu_reason}): experiments run on the CPU", err=True)
    return lease


@contextlib.contextmanager
def _backend(repo: Path | None = None):
    """The image store and executor for a command that looks at, cleans or moves what runs:
    those `repo`'s runner.yaml names (a cluster's nodes where `cluster:` is set), else this
    host's engine. Opened without placing cluster workers; closed after the `with` block."""
    from sandbox.backend import BackendSettings, open_backend

    backend = open_backend(_config(repo).backend_settings() if repo is not None else BackendSettings(), runs=False)
    try:
        yield backend
    finally:
        backend.close()


@app.command("version")
def version() -> None:
    """Print the runner version."""
    typer.echo(__version__)


@app.command("init-example")
@cli_command
def init_example(directory: Path = typer.Argument(..., help="Where to create the example repo (must not exist or be empty).")) -> None:
    """Copy the bundled tinylm research target into DIRECTORY as a fresh git repo."""
    from .examples import init_example as do_init

    path = do_init(directory)
    typer.echo(f"created {path} (git repo, one commit). Next: cd {path} && runner prepare && runner start --tag demo")


@app.command("prepare")
@cli_command
def prepare(repo: Path = RepoOpt, data_dir: Optional[Path] = typer.Option(None, help="Prepared-data cache on the host."),
            cluster: Optional[str] = typer.Option(None, help="Prepare on every node of this Ray cluster (ray://HOST:PORT).")) -> None:
    """Run the repo's own prepare.py once, in the trainer image, with the data cache writable
    (with --cluster: once on each node)."""
    from .engine import Engine

    cfg = _config(repo, data_dir=data_dir, cluster=cluster)
    research = _open_repo(cfg.repo)
    files = RunnerFiles(research.path)
    log = files.prepare_log
    with Engine(cfg, research, progress=typer.echo) as engine:  # a cluster's workers go at the end
        result = engine.prepare_data(log)
        fetch, report = engine.fetch_hub(files.hub_fetch_log) if result.exit_code == 0 and not result.reason else (None, None)
    if result.exit_code != 0 or result.reason:
        typer.echo(f"error: prepare.py failed ({result.reason or 'exit ' + str(result.exit_code)}); read {result.log_path}:\n"
                   f"{block(result.tail_lines(15))}", err=True)
        raise typer.Exit(2)
    typer.echo(block(result.tail_lines(5)))
    typer.echo(f"data ready in {cfg.data_dir}")
    for label in report.fetched:
        typer.echo(f"hub: fetched {label} into {cfg.hf_cache}")
    for line in report.failed:
        typer.echo(f"warning: hub: could not fetch {one_line(line, 400)}", err=True)
    if fetch is not None and (fetch.reason or fetch.exit_code != 0 or report.fatal):
        why = one_line(report.fatal[0], 400) if report.fatal else fetch.reason or f"exit {fetch.exit_code}"
        typer.echo(f"error: fetching Hugging Face Hub repos failed ({why}); read {fetch.log_path}", err=True)
        raise typer.Exit(2)


@app.command("run")
@cli_command
def run(
    repo: Path = RepoOpt,
    commit: str = typer.Option("HEAD", help="The commit to run."),
    budget: Optional[float] = typer.Option(None, help="Training budget in seconds (default: TIME_BUDGET of prepare.py)."),
    gpus: Optional[str] = typer.Option(None, help="none | all | a count like 4 | indices like 0,2"),
    tag: str = typer.Option("adhoc", help="Image repository tag: autoresearch-runner/<tag>:<commit>."),
    data_dir: Optional[Path] = typer.Option(None, help="Prepared-data cache on the host."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    seed_offset: int = typer.Option(0, help="Added to every seed train.py sets (0: exactly its own seeds)."),
) -> None:
    """Run one commit in the sandbox and print its result."""
    from sandbox.naming import check_tag

    from .engine import Engine

    cfg = _config(repo, budget_s=budget, gpus=gpus, data_dir=data_dir)
    check_tag(tag)
    research = _open_repo(cfg.repo)
    research.ensure_clean()
    sha = research.resolve(commit).sha
    with _leased(cfg.gpus) as lease:
        with Engine(cfg, research, gpus=lease, progress=lambda m: typer.echo(m, err=True)) as engine:
            log = RunnerFiles(research.path).adhoc_run_log(sha)
            result = engine.run_commit(sha, tag, log, seed=seed_offset)
            if cfg.verify != "off":
                result = engine.verify(result, tag)
    record = result.record()
    if as_json:
        typer.echo(json.dumps(record.to_json(), sort_keys=True))
    else:
        val = "-" if record.val_bpb is None else f"{record.val_bpb:.6f}"
        verdict = f" verdict:{record.verdict}" if record.verdict else ""
        if record.heldout_val_bpb is not None:
            verdict += f" heldout_bpb:{record.heldout_val_bpb:.6f}"
        typer.echo(f"{record.status} {record.reason}{verdict} val_bpb:{val} mem:{record.memory_gb}GB "
                   f"wall:{record.wall_s}s overhead:{record.overhead_s}s image:{record.image} log:{record.log}")
        if record.detail:
            typer.echo(record.detail)


@app.command("start")
@cli_command
def start(
    tag: str = typer.Option(..., help="Run tag: the branch is autoresearch/<tag>."),
    repo: Path = RepoOpt,
    resume: bool = typer.Option(False, help="Continue a stopped or killed run of this tag."),
    max_experiments: Optional[int] = typer.Option(None, help="Stop after N experiments (the baseline not counted)."),
    budget: Optional[float] = typer.Option(None, help="Training budget in seconds per experiment."),
    proposer: Optional[str] = typer.Option(None, help="auto | offline | claude"),
    min_delta: Optional[str] = typer.Option(None, help="A keep must beat the best by this much; 'auto' = 2 x noise spread."),
    seed: Optional[int] = typer.Option(None, help="Offline proposer seed."),
    gpus: Optional[str] = typer.Option(None, help="none | all | a count like 4 | indices like 0,2"),
    workers: Optional[int] = typer.Option(None, help="Parallel experiments (default: one per GPU; CPU hosts: 1, each worker gets a cpuset)."),
    data_dir: Optional[Path] = typer.Option(None, help="Prepared-data cache on the host."),
    cluster: Optional[str] = typer.Option(None, help="Run experiments on a Ray cluster: ray://HOST:PORT (see README)."),
    confirm: Optional[str] = typer.Option(None, help="Extra runs (other seeds) a would-be keep must hold through: auto (1), off, or N."),
    max_hours: Optional[float] = typer.Option(None, help="Stop proposing after this many hours (runner.yaml: max_hours)."),
    max_cost_usd: Optional[float] = typer.Option(None, help="Stop proposing once the model spend reaches this many USD."),
) -> None:
    """Run the research loop on branch autoresearch/<tag> until stopped (Ctrl-C prints a summary)
    or a cap is reached (max_experiments, max_hours, max_cost_usd, max_total_tokens)."""
    from sandbox.naming import check_tag

    from .engine import Engine, Slot, cpuset_cpus, fit_to_host, make_slots
    from .loop import Loop
    from .progress import LiveReporter, Reporter
    from .proposers import make_proposer

    delta = None if min_delta is None else (min_delta if min_delta == "auto" else _float(min_delta, "--min-delta"))
    cfg = _config(repo, tag=check_tag(tag), max_experiments=max_experiments, budget_s=budget, proposer=proposer,
                  min_delta=delta, seed=seed, gpus=gpus, workers=workers, data_dir=data_dir, cluster=cluster,
                  confirm=int(confirm) if confirm and confirm.isdigit() else confirm, max_hours=max_hours,
                  max_cost_usd=max_cost_usd)
    research = _open_repo(cfg.repo)
    if cfg.cluster:  # the nodes lease their own GPUs; this host only builds images and decides
        with Engine(cfg, research, progress=typer.echo) as engine:
            slots = [Slot(f"cluster worker {i}") for i in range(engine.executor.slots or 1)]
            typer.echo(f"cluster {cfg.cluster}: {len(slots)} worker(s) on " + ", ".join(engine.executor.nodes()))
            reporter = LiveReporter(cfg.tag) if sys.stdout.isatty() else Reporter(typer.echo)
            Loop(cfg, research, engine, make_proposer(cfg, research), out=reporter).run(resume=resume, slots=slots)
        return
    with _leased(cfg.gpus) as lease:
        slots = make_slots(lease.devices, cfg.workers, cpuset_cpus(cfg.limits.cpuset))
        cfg, fitted = fit_to_host(cfg, len(slots))
        if fitted:
            typer.echo(fitted)
        with Engine(cfg, research, gpus=lease, progress=typer.echo) as engine:
            # A live panel on a terminal; plain [EXP] lines when piped or logged.
            reporter = LiveReporter(cfg.tag) if sys.stdout.isatty() else Reporter(typer.echo)
            loop = Loop(cfg, research, engine, make_proposer(cfg, research), out=reporter)
            loop.run(resume=resume, slots=slots)


def _float(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        from .config import ConfigError

        raise ConfigError(f"{name} must be a number or 'auto', got {text!r}") from None


images_app = typer.Typer(help="Experiment images: list them, and remove what a policy allows.")
app.add_typer(images_app, name="images")


@app.command("rerun")
@cli_command
def rerun(
    what: str = typer.Argument(..., help="A commit (prefix) or an experiment image reference."),
    n: int = typer.Option(1, "--n", help="How many times to run it."),
    tag: Optional[str] = typer.Option(None, help="The run tag, if the commit has images in several."),
    repo: Path = RepoOpt,
    data_dir: Optional[Path] = typer.Option(None, help="Prepared-data cache on the host."),
    gpus: Optional[str] = typer.Option(None, help="none | all | a count like 4 | indices like 0,2 (default: runner.yaml's)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Run an experiment image again, exactly: same image, limits and data. Prints recorded vs new."""
    from . import reruns
    from .engine import Engine

    cfg = _config(repo, data_dir=data_dir, gpus=gpus)
    with _leased(cfg.gpus) as lease:
        with Engine(cfg, None, gpus=lease, progress=lambda m: typer.echo(m, err=True)) as engine:
            image = reruns.find_experiment_image(engine.store, what, tag)
            root = repo.resolve() if RunnerFiles(repo).dir.exists() else None
            record = reruns.recorded_result(root, image)
            log_dir = RunnerFiles(root or Path(tempfile.gettempdir())).reruns_dir
            out = reruns.compare(image, record, reruns.rerun(engine, image, n, log_dir))
    if as_json:
        typer.echo(json.dumps(out))
        return
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    source = " (imported: unverified)" if out["recorded_source"] == "imported" else ""
    typer.echo(f"{image.ref} (commit {image.commit[:7]}, recorded: {out['recorded_status'] or 'unknown'}{source})")
    typer.echo(f"  recorded val_bpb: {fmt(out['recorded_val_bpb'], '.6f')}")
    for v, d, status in zip(out["new_val_bpb"], out["diff"], out["statuses"]):
        typer.echo(f"  rerun   val_bpb: {fmt(v, '.6f')}  diff {fmt(d, '+.6f')}  ({status})")


@app.command("noise")
@cli_command
def noise(
    tag: str = typer.Option(..., help="The run whose baseline to rerun."),
    n: int = typer.Option(3, "--n", help="Reruns of the baseline."),
    repo: Path = RepoOpt,
    data_dir: Optional[Path] = typer.Option(None, help="Prepared-data cache on the host."),
    gpus: Optional[str] = typer.Option(None, help="none | all | a count like 4 | indices like 0,2 (default: runner.yaml's)"),
) -> None:
    """Rerun a run's baseline N times and record the spread; --min-delta auto then keeps only
    improvements beyond twice that spread."""
    from . import reruns
    from .engine import Engine
    from .ledger import Ledger
    from .records import Noise
    from .summary import OutcomeStatus

    cfg = _config(repo, data_dir=data_dir, gpus=gpus)
    ledger = Ledger(cfg.repo, tag)
    baseline = next((e for e in ledger.experiments() if e.iteration == 0), None)
    if baseline is None:
        from .loop import LoopError

        raise LoopError(f"run {tag} has no baseline yet: start it first (`runner start --tag {tag}`)")
    with _leased(cfg.gpus) as lease:
        with Engine(cfg, None, gpus=lease, progress=typer.echo) as engine:
            image = reruns.find_experiment_image(engine.store, baseline.commit, tag)
            runs = reruns.rerun(engine, image, n, ledger.runs_dir)
    values = [r.outcome.val_bpb for r in runs if r.outcome.status == OutcomeStatus.OK]
    if len(values) < 2:
        typer.echo("error: fewer than 2 reruns succeeded; read their logs under .autoresearch/", err=True)
        raise typer.Exit(2)
    result = reruns.noise_floor(values)
    path = reruns.save_noise(ledger, result)
    ledger.event(Noise(**result, min_delta=2 * result["spread"]))
    typer.echo(f"baseline {image.commit[:7]}: {n} reruns, mean {result['mean']:.6f}, stdev {result['stdev']:.6f}, "
               f"spread {result['spread']:.6f} -> --min-delta auto = {2 * result['spread']:.6f} (saved {path})")


@app.command("ablate")
@cli_command
def ablate(
    tag: str = typer.Option(..., help="The run whose keeps to ablate."),
    seeds: Optional[int] = typer.Option(None, help="Runs per variant, seed offsets 0..N-1 (default: as many as a keep needs)."),
    repo: Path = RepoOpt,
    data_dir: Optional[Path] = typer.Option(None, help="Prepared-data cache on the host."),
    gpus: Optional[str] = typer.Option(None, help="none | all | a count like 4 | indices like 0,2 (default: runner.yaml's)"),
) -> None:
    """On a run's final best, revert each kept change alone, run each with the same seeds, and say
    which keeps still help, by how much, and which could be dropped (also in report.html)."""
    from . import ablate as abl
    from .engine import Engine
    from .ledger import Ledger

    cfg = _config(repo, data_dir=data_dir, gpus=gpus)
    n = seeds if seeds is not None else 1 + cfg.confirm_runs
    if n < 1:
        from .config import ConfigError

        raise ConfigError(f"--seeds must be at least 1, got {n}")
    research = _open_repo(cfg.repo)
    ledger = Ledger(cfg.repo, tag)
    with _leased(cfg.gpus) as lease:
        with Engine(cfg, research, gpus=lease, progress=lambda m: typer.echo(m, err=True)) as engine:
            report = abl.ablate(engine, research, ledger, n, cfg.min_delta if isinstance(cfg.min_delta, float) else 0.0,
                                progress=lambda m: typer.echo(m, err=True))
    for line in report.lines():
        typer.echo(line)


@images_app.callback(invoke_without_command=True)
@cli_command
def images_list(
    ctx: typer.Context,
    tag: Optional[str] = typer.Option(None, help="Only this run tag."),
    repo: Path = RepoOpt,
) -> None:
    """List experiment images with status, val_bpb and the disk each added."""
    if ctx.invoked_subcommand:
        return
    from . import reruns

    with _backend() as backend:  # images are built, kept and listed on this host
        found = reruns.experiment_images(backend.store, tag)
    root = repo.resolve()
    typer.echo(f"{'image':48} {'status':8} {'val_bpb':>9} {'added':>10}")
    for img in found:
        rec = reruns.recorded_result(root, img)
        val = rec.val_bpb if rec else None
        typer.echo(f"{img.ref:48} {(rec and rec.status) or '?':8} {'-' if not val else f'{val:.6f}':>9} "
                   f"{img.size_added_bytes / 1024:>8.1f}KiB")
    if found:
        mean = sum(i.size_added_bytes for i in found) / len(found)
        typer.echo(f"{len(found)} images, {mean / 1024:.1f} KiB added per experiment beyond the trainer image")


@images_app.command("gc")
@cli_command
def images_gc(
    keep_discarded: int = typer.Option(0, help="Keep the newest N discarded/crashed images per tag."),
    tag: Optional[str] = typer.Option(None, help="Only this run tag."),
    repo: Path = RepoOpt,
    dry_run: bool = typer.Option(False, help="Only say what would go."),
) -> None:
    """Remove images of discarded and crashed experiments. Never the kept chain, never an image
    whose status is unknown, never another tool's images."""
    from . import reruns

    with _backend(repo) as backend:
        found = reruns.experiment_images(backend.store, tag)
        statuses = reruns.statuses_from_ledger(repo.resolve(), {i.tag for i in found})
        doomed = reruns.gc_plan(found, statuses, keep_discarded)
        freed = sum(img.size_added_bytes for img in doomed)
        copies = 0
        if not dry_run:
            for img in doomed:
                backend.store.remove_image(img.ref)
            copies = backend.executor.release_images([img.id for img in doomed])  # a cluster's nodes hold copies
    typer.echo(f"{'would remove' if dry_run else 'removed'} {len(doomed)} image(s), {freed / 1024:.1f} KiB"
               + (f" (and {copies} cop{'y' if copies == 1 else 'ies'} on cluster nodes)" if copies else "")
               + "".join(f"\n  {i.ref}" for i in doomed))


@app.command("export")
@cli_command
def export(
    what: str = typer.Argument(..., help="A commit (prefix) or an experiment image reference."),
    output: Path = typer.Option(..., "-o", "--output", help="The file to write."),
    tag: Optional[str] = typer.Option(None),
    repo: Path = RepoOpt,
) -> None:
    """Write an experiment image and its recorded result to one file, for `runner import` elsewhere."""
    from . import reruns

    with _backend() as backend:  # images are built and kept on this host, cluster or not
        image = reruns.find_experiment_image(backend.store, what, tag)
        reruns.export_image(backend.store, image, reruns.recorded_result(repo.resolve(), image), output)
    typer.echo(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB): {image.ref}")


@app.command("import")
@cli_command
def import_(file: Path = typer.Argument(..., help="A file written by `runner export`.")) -> None:
    """Load an exported experiment; `runner rerun <image>` then runs it on this host."""
    from . import reruns

    with _backend() as backend:
        image = reruns.import_image(backend.store, file)
    typer.echo(f"imported {image.ref} (commit {image.commit[:7]}); run it with: runner rerun {image.ref}")


@app.command("report")
@cli_command
def report(
    tag: str = typer.Option(..., help="The run to report on."),
    repo: Path = RepoOpt,
    out: Optional[Path] = typer.Option(None, help="Directory for progress.png and report.html (default: .autoresearch/<tag>/)."),
    watch: bool = typer.Option(False, help="Rewrite the report as experiments are recorded (the page reloads itself) until Ctrl-C."),
    every: float = typer.Option(5.0, help="With --watch: seconds between looks at the ledger (and page reloads)."),
) -> None:
    """Write progress.png and a self-contained report.html for a run, and print its figures."""
    from . import report as rep

    if watch:
        if not every > 0:
            from .config import ConfigError

            raise ConfigError(f"--every must be a positive number of seconds, got {every}")
        # Ctrl-C or SIGTERM stops the watch at its next look, whatever the signal dispositions it
        # inherited (a shell's background job starts with SIGINT ignored).
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        rep.watch(repo.resolve(), tag, out, poll_s=every, stop=stop, say=typer.echo)
        typer.echo("stopped watching")
        return
    try:
        data = rep.collect(repo.resolve(), tag)
    except ValueError as exc:
        from .config import ConfigError

        raise ConfigError(str(exc)) from None
    png, page = rep.write_report(repo.resolve(), tag, out)
    for why in data.damaged:
        typer.echo(f"warning: {why}: skipped", err=True)
    # The ledger's text (descriptions are an LLM's words; the file may be damaged) reaches the
    # terminal through the one sanitiser.
    for line in rep.summary_lines(data):
        typer.echo(one_line(line, REPORT_LINE_MAX_CHARS))
    typer.echo("top improvements:")
    for d in data.improvements[:5]:
        typer.echo(f"  -{d['delta']:.6f}  {one_line(d['commit'], 40)}  {one_line(d['description'])}")
    typer.echo(f"wrote {png} and {page}")


@app.command("status")
@cli_command
def status(tag: Optional[str] = typer.Option(None, help="Only this run tag."), repo: Path = RepoOpt) -> None:
    """What runs now, for every user: tags, GPUs, commit, elapsed; best so far from the ledgers.
    On this host, or on every node of the cluster the repo's runner.yaml names."""
    from .status import running

    with _backend(repo) as backend:
        rows = running(backend.executor, tag)
    if not rows:
        typer.echo("no experiments running")
        return
    # The GPUs last and whole: a UUID cut short names no GPU (nvidia-smi -L prints them whole).
    typer.echo(f"{'tag':16} {'iter':>4} {'commit':8} {'elapsed':>8} {'user':>5} {'best':>9} {'keep':>4}  {'repo':30} gpus")
    for r in rows:
        n = r.night
        best = "-" if n is None or n.best_val_bpb is None else f"{n.best_val_bpb:.6f}"
        typer.echo(f"{r.tag:16} {r.iteration:>4} {r.commit[:7]:8} {r.elapsed_s:>7.0f}s "
                   f"{r.user:>5} {best:>9} {'-' if n is None else n.counts.keep:>4}  {r.repo:30} {r.gpus or '-'}")
        if n is not None:  # the night so far, in the words of the Ctrl-C summary and the report
            duty = "-" if n.duty_cycle is None else f"{100 * n.duty_cycle:.1f}%"
            typer.echo(f"    {n.counts}; accelerator duty cycle {duty}; spend {n.spend}")


@app.command("clean")
@cli_command
def clean(tag: Optional[str] = typer.Option(None, help="Only this tag's containers."), repo: Path = RepoOpt) -> None:
    """Remove this user's leftover experiment containers whose runner has died: on this host,
    and on every node of the cluster the repo's runner.yaml names."""
    with _backend(repo) as backend:
        removed = backend.executor.cleanup(tag=tag)
    typer.echo(f"removed {len(removed)} container(s)" + (": " + ", ".join(removed) if removed else ""))


@app.command("doctor")
def doctor(repo: Path = RepoOpt, data_dir: Optional[Path] = typer.Option(None)) -> None:
    """Check the daemon, base image, GPUs, repo and data cache; say what to do about each problem."""
    from .doctor import run_checks

    ok = run_checks(repo, data_dir, typer.echo)
    raise typer.Exit(0 if ok else 1)


@base_app.command("build")
@cli_command
def base_image_build(
    ca_bundle: Optional[Path] = typer.Option(None, help="CA bundle for pip in the chroot (TLS-intercepting proxies). Default: $PIP_CERT or $SSL_CERT_FILE."),
    find_links: Optional[Path] = typer.Option(None, help="Local wheel directory (air-gapped hosts). Default: $PIP_FIND_LINKS if a directory."),
    torch: str = typer.Option("torch==2.13.0+cpu", help="The torch requirement to install (a CPU build)."),
    torch_index: Optional[str] = typer.Option(None, help="Extra index with that build. Default: PyTorch's CPU index, unless --find-links is used."),
    mirror: str = typer.Option("http://deb.debian.org/debian", help="Debian mirror for debootstrap."),
    suite: str = typer.Option("bookworm", help="Debian suite."),
    force: bool = typer.Option(False, help="Rebuild even if an image with the same recipe exists."),
) -> None:
    """Build the CPU base image with debootstrap and `docker import`: no container registry needed."""
    from sandbox import images
    from .config import default_ca_bundle

    ca = ca_bundle or default_ca_bundle()
    links = find_links or _env_path("PIP_FIND_LINKS", file=False)
    recipe = images.BaseRecipe(suite=suite, mirror=mirror, python_packages=(torch,),
                               extra_index_url=torch_index or (None if links else images.TORCH_CPU_INDEX))
    with _backend() as backend:
        ref = backend.store.build_base_image(recipe, ca, links, typer.echo, force=force)
    typer.echo(ref)


@agent_app.command("build")
@cli_command
def agent_image_build(
    ca_bundle: Optional[Path] = typer.Option(None, help="CA bundle for pip during the build. Default: $PIP_CERT or $SSL_CERT_FILE."),
    base: str = typer.Option("autoresearch-runner/base:cpu", help="Base image with python3 and pip."),
) -> None:
    """Build the runner's own image from this source checkout (Dockerfile.agent)."""
    from .config import default_ca_bundle

    project = Path(__file__).resolve().parent.parent
    with _backend() as backend:
        built = backend.store.build_agent_image(project, base, ca_bundle or default_ca_bundle(), typer.echo)
    typer.echo(f"{built.ref} ({'reused' if built.reused else f'built in {built.build_s:.0f}s'})")


def _env_path(name: str, file: bool) -> Path | None:
    value = os.environ.get(name)
    if not value:
        return None
    p = Path(value)
    return p if (p.is_file() if file else p.is_dir()) else None
