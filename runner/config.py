"""RunConfig: runner.yaml in the research repo, merged with CLI options (CLI wins).

Every key of runner.yaml is a field below with its type; an unknown key or a wrong type is one
error naming the key.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sandbox.backend import EXECUTORS, BackendSettings
from sandbox.spec import GiB, MiB, Limits, confined_cpuset

from .errors import ConfigError  # noqa: F401  (raised here, and imported from here by most callers)
from .text import redact_url

CONFIG_FILE = "runner.yaml"
DATA_MOUNT = "/home/runner/.cache/autoresearch"   # where autoresearch's prepare.py looks (~ of the runner user)
HF_MOUNT = "/home/runner/.cache/huggingface/hub"  # the hub cache only: never HF_HOME, which holds token files
# The held-out data (verify_data), laid out like the data cache: the verifier evaluates with
# HOME=/home/heldout so the repo's own code reads it where it reads the data; never in experiments.
HELDOUT_MOUNT = "/home/heldout/.cache/autoresearch"
HELDOUT_ENV = "AUTORESEARCH_HELDOUT_DIR"  # names it for prepare.py (writable) and the verifier (read-only)
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.I)

# USD per million tokens (input, output), by model-name prefix (the longest prefix that matches
# wins), as Anthropic publishes them; `prices:` in runner.yaml overrides or adds entries. A model
# with no price is counted in tokens only.
DEFAULT_PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "claude-opus-4-5": (5.0, 25.0),
    "claude-opus-4": (15.0, 75.0),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-haiku-4": (1.0, 5.0),
    "claude-3-7-sonnet": (3.0, 15.0),
    "claude-3-5-haiku": (0.8, 4.0),
}
# What a notify target can be told; `digest` comes at the target's digest_at.
NOTIFY_EVENTS = ("new_best", "crash_streak", "verification_refused", "cap", "stopped", "failed")
DEFAULT_CRASH_STREAK = 3  # crashes in a row that make a `crash_streak` alert


def default_ca_bundle() -> Path | None:
    """The host's CA bundle as pip or OpenSSL are told of it, for builds behind a TLS proxy."""
    for name in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        value = os.environ.get(name)
        if value and Path(value).is_file():
            return Path(value)
    return None


def default_hub_cache() -> Path:
    """The host's Hugging Face hub cache, where huggingface_hub itself would put it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def default_data_dir() -> Path:
    return Path(os.environ.get("AUTORESEARCH_DATA_DIR", Path.home() / ".cache" / "autoresearch"))


def default_heldout_dir() -> Path:
    return Path(os.environ.get("AUTORESEARCH_HELDOUT_DIR", Path.home() / ".cache" / "autoresearch-heldout"))


@dataclass(frozen=True)
class LimitsConfig:
    """The `limits:` section. Sizes in the units their names say."""

    timeout_factor: float = 2.0      # deadline = timeout_factor x budget + startup_grace_s
    startup_grace_s: float = 60.0    # imports, data loading and evaluation around training
    overtime_s: float | None = None  # after the baseline: seconds past its wall time a run may take; null = policy.experiment_wall_limit_s's default
    kill_grace_s: float = 10.0       # SIGTERM -> SIGKILL
    memory_gb: float = 16.0          # RAM ceiling (no swap)
    cpus: float | None = None        # CPU quota in cores; null = none
    cpuset: str | None = None        # pin experiments to these host CPUs, e.g. "0-7"; null = the runner's own when it is confined (taskset, a Slurm cpuset), else any
    pids: int = 512                  # processes + threads
    tmp_mb: int = 1024               # /tmp tmpfs
    out_mb: int = 256                # /out tmpfs
    log_cap_mb: int = 8              # host log: this much of the head is kept ...
    log_tail_mb: int = 1             # ... plus this much of the tail
    vram_gb: float | None = None     # VRAM ceiling enforced by the NVML watchdog; null = none
    nofile: int = 1024               # open files per process


@dataclass(frozen=True)
class NotifyTarget:
    """One entry of `notify:`: where alerts go (exactly one of url, url_env, command) and which."""

    url: str | None = None               # a webhook: each alert is a JSON POST (see runner/notify.py)
    url_env: str | None = None           # the name of a host environment variable holding the webhook URL
    command: tuple[str, ...] = ()        # or a command (argv): each alert as JSON on its stdin
    events: tuple[str, ...] = NOTIFY_EVENTS
    crash_streak: int = DEFAULT_CRASH_STREAK  # crashes in a row that make a crash_streak alert
    digest_at: str | None = None         # "HH:MM" local time: a digest of the night every day at that time


@dataclass(frozen=True)
class RunConfig:
    repo: Path = Path(".")
    tag: str | None = None
    budget_s: float | None = None        # training budget; null = TIME_BUDGET from prepare.py
    proposer: str = "auto"               # auto | offline | claude (auto: claude if ANTHROPIC_API_KEY is set)
    model: str = "claude-sonnet-4-5"     # Claude model for the claude proposer
    max_tokens: int = 16000              # per Claude reply
    api_retries: int = 8                 # Anthropic API retries with backoff
    max_turns: int = 30                  # tool-use turns per proposal
    seed: int = 0                        # offline proposer seed
    max_experiments: int | None = None   # stop after this many experiments (baseline excluded), this session
    max_hours: float | None = None       # stop proposing after this many hours of this session
    max_cost_usd: float | None = None    # stop proposing once the tag's model spend reaches this (USD, with `prices`)
    max_total_tokens: int | None = None  # stop proposing once the tag's model tokens (in + out) reach this
    prices: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_PRICES_PER_MTOK))
    notify: tuple[NotifyTarget, ...] = ()  # alert targets (webhooks, commands)
    min_delta: float | str = 0.0         # keep needs val_bpb < best - min_delta; "auto" = 2 x the baseline's spread over seeds
    noise_runs: int = 2                  # baseline reruns (other seeds) before the first proposal, once per tag; 0 = none
    stale_after: int = 10                # experiments without improvement before widening the search
    confirm: int | str = "auto"          # extra runs (other seeds) a would-be keep needs: auto = 1, off = 0, or N
    gpus: str = "auto"                   # auto | all | none | "0,2" (indices) | "4" (a count), as docker --gpus
    gpu_runtime: str = "auto"            # auto | toolkit (nvidia-container-toolkit) | devices (device nodes + driver libs)
    workers: int | None = None           # parallel experiments; null = one per leased GPU, else 1
    prefetch: int | str = "auto"         # proposals prepared while others train; auto = 1 for claude or >1 worker
    backend: str = "docker"              # where experiments run (sandbox.backend.EXECUTORS); cluster: implies ray
    cluster: str | None = None           # a Ray cluster (ray://HOST:PORT or HOST:PORT): experiments run on its nodes
    registry: str | None = None          # HOST:PORT of a registry that moves images to cluster nodes; null = Ray's object store
    cluster_worker_gpus: float | None = None  # GPUs per cluster worker; null = 1 on a cluster with GPUs, else 0
    cluster_worker_cpus: float = 1.0     # CPUs Ray reserves per cluster worker
    runtime: str | None = None           # the engine's OCI runtime for experiments (runsc = gVisor, kata-runtime); null = default
    base_image: str = "auto"             # auto | an image reference
    dependencies: str = "auto"           # auto | none | a file: uv.lock, pyproject.toml or requirements (runner/deps.py)
    ca_bundle: Path | None = None        # CA bundle for image builds (TLS proxies); null = $PIP_CERT or $SSL_CERT_FILE
    data_dir: Path = field(default_factory=default_data_dir)  # prepared data, mounted read-only
    hf_cache: Path | None = None         # Hugging Face hub cache (HF_HUB_CACHE); null = the host's default hub cache
    hf_prefetch: tuple[str, ...] = ()    # Hub repos `runner prepare` fetches besides those found in the code
    verify: str = "auto"                 # auto | on | all | off: keeps need a val_bpb trusted code computed (see README)
    verify_target: str = "prepare.evaluate_bpb"  # the repo's evaluation function; the model it is given is exported
    verify_args: dict[str, str] = field(default_factory=dict)  # how the verifier rebuilds an argument, e.g. tokenizer: Tokenizer.from_directory()
    verify_data: Path | None = field(default_factory=default_heldout_dir)  # held-out data: prepare writes it, only the verifier reads it
    heldout: dict[str, str] = field(default_factory=dict)  # files `runner prepare` puts into verify_data: {path: source[#sha256=HEX]} (runner/heldout.py)
    verify_tolerance: float = 0.002      # relative difference self-reported vs verified beyond which a run is forged
    verify_ops: tuple[str, ...] = ()     # custom operator namespaces (the repo's own kernels) the verifier may run
    heldout_tolerance: float = 0.02      # bpb: how much less the night may gain on held-out data than on val (overfit) ...
    heldout_relative: float = 0.05       # ... plus this fraction of its val gain (held-out text of another distribution)
    command: tuple[str, ...] = ("python", "train.py")
    env: dict[str, str] = field(default_factory=dict)  # extra variables for experiments (no secrets)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    @property
    def confirm_runs(self) -> int:
        """Extra runs, each with another seed, that a result must hold through to be kept."""
        if self.confirm is False or self.confirm == "off":  # YAML reads a bare `off` as false
            return 0
        return 1 if self.confirm == "auto" else int(self.confirm)

    @property
    def heldout_rule(self) -> "HeldoutRule":
        """The overfit rule's allowances (runner/policy.py overfit)."""
        from .policy import HeldoutRule
        return HeldoutRule(self.heldout_tolerance, self.heldout_relative)

    def sandbox_limits(self, time_budget_s: float) -> Limits:
        """The sandbox's limits for a run of `time_budget_s`. Without limits.cpuset, runs on this
        host's engine keep to the CPUs this process may use (sandbox.spec.confined_cpuset): a
        runner confined to part of a shared host does not spread its experiments over the rest.
        On a cluster the driver's CPUs say nothing of a node's."""
        lim = self.limits
        cpuset = lim.cpuset or (confined_cpuset() if not self.cluster and self.backend == "docker" else None)
        return Limits(
            time_budget_s=time_budget_s,
            timeout_factor=lim.timeout_factor,
            startup_grace_s=lim.startup_grace_s,
            kill_grace_s=lim.kill_grace_s,
            mem_limit_bytes=int(lim.memory_gb * GiB),
            cpus=lim.cpus,
            cpuset=cpuset,
            pids_limit=lim.pids,
            tmp_size_bytes=lim.tmp_mb * MiB,
            out_size_bytes=lim.out_mb * MiB,
            log_cap_bytes=lim.log_cap_mb * MiB,
            log_tail_bytes=lim.log_tail_mb * MiB,
            vram_limit_gb=lim.vram_gb,
            nofile=lim.nofile,
            runtime=self.runtime,
        )

    def backend_settings(self, data_target: str = "", data_check=None) -> BackendSettings:
        """What sandbox.backend.open_backend opens for this config: the cluster's executor where
        `cluster:` is set, else the `backend:` named. `data_target`/`data_check`: the data mount
        every node must hold the same digest of."""
        return BackendSettings(executor="ray" if self.cluster else self.backend, address=self.cluster,
                               workers=self.workers, worker_gpus=self.cluster_worker_gpus,
                               worker_cpus=self.cluster_worker_cpus, registry=self.registry,
                               gpu_runtime=self.gpu_runtime, data_target=data_target, data_check=data_check)

    def to_dict(self) -> dict:
        def plain(v):
            if isinstance(v, Path):
                return str(v)
            if isinstance(v, tuple):
                return list(v)
            return v
        d = dataclasses.asdict(self)
        # events.jsonl and the report get this dict: a webhook's secret (its path, query or
        # userinfo) and a command's arguments stay out of it.
        d["notify"] = [{**t, "url": t["url"] and redact_url(t["url"]), "command": list(t["command"][:1])}
                       for t in d["notify"]]
        return {k: ({kk: plain(vv) for kk, vv in v.items()} if isinstance(v, dict) else plain(v)) for k, v in d.items()}


def _check_type(key: str, value, hint):
    """Coerce `value` to `hint` where that is lossless, else raise ConfigError naming `key`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        errors = []
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    if hint is Path and isinstance(value, str):
        return Path(value).expanduser()
    args = typing.get_args(hint)
    if origin is tuple and isinstance(value, list) and args[1:] == (Ellipsis,) and all(isinstance(v, str) for v in value):
        return tuple(value)
    if origin is tuple and isinstance(value, list) and Ellipsis not in args and len(value) == len(args):
        return tuple(_check_type(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        if args and args[1] is not str:
            return {k: _check_type(f"{key}.{k}", v, args[1]) for k, v in value.items()}
        return {k: str(v) for k, v in value.items()}
    name = getattr(hint, "__name__", str(hint))
    if origin is tuple and args and Ellipsis not in args:
        name = "[" + ", ".join(a.__name__ for a in args) + "]"
    raise ConfigError(f"{CONFIG_FILE}: key '{key}' must be {name}, got {value!r}")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{CONFIG_FILE}: '{prefix.rstrip('.') or 'top level'}' must be a mapping of keys")
    hints = _hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known or key in ("repo", "tag"):
            allowed = sorted(known - {"repo", "tag"})
            raise ConfigError(f"{CONFIG_FILE}: unknown key '{prefix}{key}' (known keys: {', '.join(allowed)})")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value or {}, f"{prefix}{key}.")
        elif typing.get_origin(hints[key]) is tuple and dataclasses.is_dataclass(typing.get_args(hints[key])[0]):
            items = [value] if isinstance(value, dict) else value or []  # one target may be written without a list
            if not isinstance(items, list):
                raise ConfigError(f"{CONFIG_FILE}: '{prefix}{key}' must be a list of mappings")
            kwargs[key] = tuple(_build(typing.get_args(hints[key])[0], v, f"{prefix}{key}[{i}].") for i, v in enumerate(items))
        else:
            kwargs[key] = _check_type(prefix + key, value, hints[key])
    return cls(**kwargs)


def _anchored(cfg: RunConfig, base: Path) -> RunConfig:
    """`cfg` with each path's ~ expanded and a relative one under `base` (an absolute one stays
    itself: base / absolute is the absolute path). Paths are mounted into containers, which need
    them absolute."""
    return dataclasses.replace(cfg, **{f.name: base / getattr(cfg, f.name).expanduser() for f in dataclasses.fields(cfg)
                                       if isinstance(getattr(cfg, f.name), Path)})


def load_config(repo: Path, overrides: dict | None = None) -> RunConfig:
    """runner.yaml of `repo` (if present) with `overrides` (CLI options that were given) on top.

    Raises:
        ConfigError: unreadable YAML, an unknown key, a wrong type, or an invalid value.
    """
    path = Path(repo) / CONFIG_FILE
    data: dict = {}
    if path.exists():
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{CONFIG_FILE} is not valid YAML: {exc}".splitlines()[0]) from None
    if isinstance(data, dict) and isinstance(data.get("verify"), bool):  # YAML reads a bare on/off as a boolean
        data["verify"] = "on" if data["verify"] else "off"
    if isinstance(data, dict) and isinstance(data.get("confirm"), bool):  # `confirm: off` (on: the default, auto)
        data["confirm"] = "auto" if data["confirm"] else "off"
    cfg = _anchored(_build(RunConfig, data), Path(repo).resolve())  # runner.yaml's relative paths: from the repo
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    limit_overrides = {k: overrides.pop(k) for k in list(overrides) if k in {f.name for f in dataclasses.fields(LimitsConfig)}}
    if limit_overrides:
        overrides["limits"] = dataclasses.replace(cfg.limits, **limit_overrides)
    cfg = _anchored(dataclasses.replace(cfg, repo=Path(repo).resolve(), **overrides), Path.cwd())  # the command line's: from here
    if cfg.ca_bundle is None:
        cfg = dataclasses.replace(cfg, ca_bundle=default_ca_bundle())
    if cfg.hf_cache is None:
        cfg = dataclasses.replace(cfg, hf_cache=default_hub_cache())
    if isinstance(data, dict) and "prices" in data:  # runner.yaml's prices add to (or override) the defaults
        cfg = dataclasses.replace(cfg, prices={**DEFAULT_PRICES_PER_MTOK, **cfg.prices})
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    if cfg.proposer not in ("auto", "offline", "claude"):
        raise ConfigError(f"proposer must be auto, offline or claude, got {cfg.proposer!r}")
    if isinstance(cfg.prefetch, str) and cfg.prefetch != "auto":
        raise ConfigError(f"prefetch must be a number or 'auto', got {cfg.prefetch!r}")
    if cfg.verify not in ("auto", "on", "all", "off", "sample"):  # sample: what `on` now does (older runner.yaml)
        raise ConfigError(f"verify must be auto, on, all or off, got {cfg.verify!r}")
    if "." not in cfg.verify_target:
        raise ConfigError(f"verify_target must be module.function, got {cfg.verify_target!r}")
    for name, recipe in cfg.verify_args.items():
        try:
            ast.parse(recipe, mode="eval")
        except SyntaxError:
            raise ConfigError(f"verify_args.{name} must be an expression such as Tokenizer.from_directory(), got {recipe!r}") from None
    for namespace in cfg.verify_ops:
        if not re.fullmatch(r"[A-Za-z_]\w*", namespace) or namespace in ("aten", "prims", "higher_order"):
            raise ConfigError(f"verify_ops lists operator namespaces such as flash_attn_3, got {namespace!r}")
    if not cfg.heldout_tolerance >= 0:
        raise ConfigError(f"heldout_tolerance must be a number of bpb >= 0, got {cfg.heldout_tolerance!r}")
    if not 0 <= cfg.heldout_relative < 1:
        raise ConfigError(f"heldout_relative must be a fraction of the val gain, 0 <= x < 1, got {cfg.heldout_relative!r}")
    if cfg.verify_data is not None:
        data, heldout = Path(cfg.data_dir).expanduser().absolute(), Path(cfg.verify_data).expanduser().absolute()
        if heldout == data or data in heldout.parents or heldout in data.parents:
            raise ConfigError(f"verify_data ({heldout}) must be outside data_dir ({data}): experiments see data_dir")
    if cfg.gpu_runtime not in ("auto", "toolkit", "devices"):
        raise ConfigError(f"gpu_runtime must be auto, toolkit or devices, got {cfg.gpu_runtime!r}")
    if cfg.backend not in EXECUTORS:
        raise ConfigError(f"backend must be one of {', '.join(sorted(EXECUTORS))}, got {cfg.backend!r}")
    if cfg.backend == "ray" and not cfg.cluster:
        raise ConfigError("backend: ray needs the cluster's address: set cluster: HOST:PORT (ray start --head prints it)")
    if cfg.cluster is not None and not re.fullmatch(r"(ray://)?[\w.\-\[\]:]+:\d+", cfg.cluster):
        raise ConfigError(f"cluster must be ray://HOST:PORT or HOST:PORT, got {cfg.cluster!r}")
    if cfg.registry is not None and not re.fullmatch(r"[\w.\-\[\]:]+:\d+", cfg.registry):
        raise ConfigError(f"registry must be HOST:PORT, got {cfg.registry!r}")
    if cfg.workers is not None and cfg.workers < 1:
        raise ConfigError(f"workers must be at least 1, got {cfg.workers}")
    gpus = cfg.cluster_worker_gpus
    if gpus is not None and not (gpus >= 0 and float(gpus).is_integer()):
        # a worker leases its GPUs exclusively: half a GPU would give two workers one lease
        raise ConfigError(f"cluster_worker_gpus must be a whole number of GPUs, got {gpus:g}")
    if not (cfg.confirm is False or cfg.confirm in ("auto", "off") or (isinstance(cfg.confirm, int) and not isinstance(cfg.confirm, bool)
                                               and 0 <= cfg.confirm <= 10)):
        raise ConfigError(f"confirm must be auto, off or a number of extra runs from 0 to 10, got {cfg.confirm!r}")
    if not (isinstance(cfg.noise_runs, int) and not isinstance(cfg.noise_runs, bool) and 0 <= cfg.noise_runs <= 20):
        raise ConfigError(f"noise_runs must be a number of baseline reruns from 0 to 20, got {cfg.noise_runs!r}")
    if cfg.min_delta == "auto" and not cfg.noise_runs:
        raise ConfigError("min_delta auto is twice the baseline's spread over seeds: set noise_runs to 1 or more")
    if isinstance(cfg.min_delta, str) and cfg.min_delta != "auto":
        raise ConfigError(f"min_delta must be a number or 'auto', got {cfg.min_delta!r}")
    if cfg.budget_s is not None and cfg.budget_s <= 0:
        raise ConfigError(f"budget must be positive seconds, got {cfg.budget_s}")
    if cfg.limits.overtime_s is not None and not cfg.limits.overtime_s >= 0:
        raise ConfigError(f"limits.overtime_s must be seconds >= 0 (or null for the default), got {cfg.limits.overtime_s!r}")
    for key in ("memory_gb", "pids", "tmp_mb", "out_mb", "log_cap_mb", "log_tail_mb", "kill_grace_s", "timeout_factor",
                "nofile"):
        if getattr(cfg.limits, key) <= 0:
            # log_tail_mb 0 would keep no summary block: every run would be judged no_summary
            raise ConfigError(f"limits.{key} must be positive, got {getattr(cfg.limits, key)}")
    from .hub import parse_prefetch

    for entry in cfg.hf_prefetch:
        parse_prefetch(entry)
    from .heldout import parse as parse_heldout

    for target, source in cfg.heldout.items():
        parse_heldout(target, source)
    if cfg.heldout and cfg.verify_data is None:
        raise ConfigError("heldout: names files for verify_data, which is null")
    for name in cfg.env:
        if _SECRET_NAME.search(name):
            raise ConfigError(f"env: '{name}' looks like a secret; experiments never receive secrets")
    _validate_caps(cfg)
    for i, target in enumerate(cfg.notify):
        _validate_target(f"notify[{i}]", target)


def _validate_caps(cfg: RunConfig) -> None:
    from .spend import price_per_mtok

    for key in ("max_hours", "max_cost_usd", "max_total_tokens", "max_experiments"):
        value = getattr(cfg, key)
        if value is not None and not value > 0 and not (key == "max_experiments" and value == 0):
            raise ConfigError(f"{key} must be a positive number (or null for no cap), got {value!r}")
    for model, (per_in, per_out) in cfg.prices.items():
        if not (per_in >= 0 and per_out >= 0):
            raise ConfigError(f"prices.{model} must be [USD per million input tokens, USD per million output tokens], "
                              f"both >= 0, got {[per_in, per_out]}")
    if cfg.max_cost_usd is not None and cfg.proposer != "offline" and price_per_mtok(cfg.model, cfg.prices) is None:
        raise ConfigError(f"max_cost_usd needs the price of model {cfg.model}: add it to runner.yaml as "
                          f"prices: {{{cfg.model}: [USD per million input tokens, USD per million output tokens]}}")


def _validate_target(key: str, target: NotifyTarget) -> None:
    """One notify target's error names the entry and shows a URL as scheme://host only (its secret stays out)."""
    given = [name for name in ("url", "url_env", "command") if getattr(target, name)]
    if len(given) != 1:
        raise ConfigError(f"{key} needs exactly one of url, url_env or command, got {', '.join(given) or 'none'}")
    if target.url is not None and redact_url(target.url).split("://")[0] not in ("http", "https"):
        raise ConfigError(f"{key}.url must be an http:// or https:// URL, got {redact_url(target.url)}")
    if target.url_env is not None and not re.fullmatch(r"[A-Za-z_]\w*", target.url_env):
        raise ConfigError(f"{key}.url_env must be the name of an environment variable, got {target.url_env!r}")
    unknown = sorted(set(target.events) - set(NOTIFY_EVENTS))
    if unknown:
        raise ConfigError(f"{key}.events: unknown event {unknown[0]!r} (known: {', '.join(NOTIFY_EVENTS)}; "
                          "a daily digest is digest_at: HH:MM)")
    if target.crash_streak < 1:
        raise ConfigError(f"{key}.crash_streak must be at least 1, got {target.crash_streak}")
    if target.digest_at is not None and not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", target.digest_at):
        raise ConfigError(f"{key}.digest_at must be a local time HH:MM such as 07:30, got {target.digest_at!r}")
