"""The records the ledger writes and reads back, typed: results.tsv's `Row`, the engine's
`RunRecord` of one run, and events.jsonl's events, one frozen dataclass per kind.

The text on disk is what earlier versions wrote: statuses and verdicts are StrEnums written as
their values, an enum field that is absent is written "" (an unverified run's verdict, as it
always was), and an event line is its fields beside "ts", "tag", "event" (its kind) and, since
version 1, "v". A line without "v" is version 0: the same fields, read the same way. A line of a
later version is refused (this reader cannot know what changed); one of a kind this version
does not know is left out.

`parse` is the one reader of a record (`parse_event` of an events.jsonl line): every field is
checked against its annotation, and a required field that is missing or a value of the wrong type
is a ValueError naming it. `to_json` is the one writer's view of a record. A record built in code
is checked the same way when it is made. Ledger (ledger.py) does the file I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, TypeVar

from sandbox.hooks.verify_protocol import Verdict

from .summary import Metrics, OutcomeStatus
from .text import one_line

EVENTS_VERSION = 1  # the "v" of every event written now; a line without one is version 0
COMMIT_MAX_CHARS = 40  # a row's commit column (a short sha; a full one at most)

R = TypeVar("R")


# --- the one reader and writer of a record ---------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional_enum(hint) -> bool:
    """Whether `hint` is `SomeEnum | None`: such a value is written "" when it is None."""
    args = typing.get_args(hint)
    return (typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
            and any(isinstance(a, type) and issubclass(a, enum.Enum) for a in args))


def _coerce(value, hint, where: str):
    """`value` as `hint` says it must be, or a ValueError naming `where`. Enums are made from their
    values and dataclasses from objects; numbers are not converted (an int stays one, so the text
    written back is the text read)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if value == "" and _optional_enum(hint):
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"{where}: only `X | None` unions are records' types, not {hint}")
        return _coerce(value, inner[0], where)
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} is {_shown(value)}, not a list")
        items = [_coerce(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if tuple in (origin, hint) else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} is {_shown(value)}, not an object")
        if args and args[1] is not Any:
            return {k: _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
        return value
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if isinstance(value, hint):
            return value
        try:
            return hint(value)
        except ValueError:
            raise ValueError(f"{where} is {_shown(value)}, not one of {', '.join(m.value for m in hint)}") from None
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return parse(hint, value, f"{where}.")
        raise ValueError(f"{where} is {_shown(value)}, not an object")
    kinds = {float: (int, float), int: (int,), bool: (bool,), str: (str,)}.get(hint)
    if kinds is None:
        raise TypeError(f"{where}: {hint} is not a type records hold")
    if not isinstance(value, kinds) or (isinstance(value, bool) and hint is not bool):
        raise ValueError(f"{where} is {_shown(value)}, not {'a number' if hint is float else hint.__name__}")
    return value


def _shown(value) -> str:
    return "null" if value is None else one_line(repr(value), 60)


def parse(cls: type[R], obj, where: str = "") -> R:
    """A `cls` (a dataclass) from a JSON object: its known keys, each checked and made typed;
    keys it does not know (another version's) are left out.

    Raises:
        ValueError: `obj` is not an object, a field without a default is missing, or a value is
            not of its field's type; the message names the field (`where` prefixes it).
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{where.rstrip('.') or 'it'} is {_shown(obj)}, not an object")
    hints, values = _hints(cls), {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in obj:
            values[f.name] = _coerce(obj[f.name], hints[f.name], where + f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{where}{f.name} is missing")
    return cls(**values)


def to_json(value, hint=Any):
    """`value` (a record, or what one holds) as plain JSON data, as the ledger writes it."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        hints = _hints(type(value))
        return {f.name: to_json(getattr(value, f.name), hints[f.name]) for f in dataclasses.fields(value)}
    if value is None and _optional_enum(hint):
        return ""  # an enum that is absent (a run not verified) is written "", as it always was
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


class Typed:
    """A record whose fields are checked (and made typed: "keep" becomes RowStatus.KEEP, a dict
    a RunRecord) when it is made, wherever it is made.

    Raises (on construction):
        ValueError: a value is not of its field's type.
    """

    def __post_init__(self):
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            typed = _coerce(value, hints[f.name], f.name)
            if typed is not value:
                object.__setattr__(self, f.name, typed)


# --- results.tsv -------------------------------------------------------------------------------


class RowStatus(StrEnum):
    """The status column of results.tsv, as autoresearch writes it."""

    KEEP = "keep"
    DISCARD = "discard"
    CRASH = "crash"


STATUSES = tuple(RowStatus)


@dataclass(frozen=True)
class Row(Typed):
    """One line of results.tsv. What prints it (`line`, `exp_line`) passes its text through the
    one sanitiser itself, whoever built it: tabs, newlines and terminal escapes in a description
    (an LLM's words) never break the TSV or reach a terminal."""

    commit: str
    val_bpb: float
    memory_gb: float
    status: RowStatus
    description: str

    def line(self) -> str:
        """The row as results.tsv holds it: one line, five tab-separated columns."""
        return (f"{one_line(self.commit, COMMIT_MAX_CHARS)}\t{self.val_bpb:.6f}\t{self.memory_gb:.1f}\t"
                f"{self.status}\t{one_line(self.description)}")

    def exp_line(self, tag: str, iteration: int) -> str:
        """The `[EXP]` line the loop prints for it."""
        return (f"[EXP] {one_line(tag)} {iteration} | commit:{one_line(self.commit, COMMIT_MAX_CHARS)} | "
                f"val_bpb:{self.val_bpb:.6f} | mem:{self.memory_gb:.1f}GB | status:{self.status} | "
                f"{one_line(self.description)}")

    @classmethod
    def parse(cls, line: str) -> "Row":
        """Raises:
            ValueError: not five columns, a number that is not one, or an unknown status."""
        commit, val, mem, status, desc = line.split("\t", 4)
        return cls(commit, float(val), float(mem), status, desc)


# --- events.jsonl --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord(Typed):
    """The engine's record of one run (ExperimentRun.record), as events keep it. Every field has
    a default: records of earlier versions lack the newer ones."""

    status: OutcomeStatus | None = None
    reason: str = ""
    detail: str = ""
    val_bpb: float | None = None
    verdict: Verdict | None = None  # None: not verified (written "")
    self_reported_val_bpb: float | None = None
    heldout_val_bpb: float | None = None
    margin_bpb: float = 0.0           # what reading ahead inside the verifier's tolerance could gain
    verify_s: float = 0.0
    verify_phases: dict | None = None
    memory_gb: float = 0.0
    commit: str = ""
    image: str = ""
    image_id: str | None = None
    node: str | None = None
    image_transfer_bytes: int | None = None
    image_reused: bool = False
    image_build_s: float = 0.0        # making the experiment image (0 when it was reused)
    exit_code: int | None = None
    wall_s: float = 0.0
    total_s: float = 0.0
    overhead_s: float = 0.0
    training_seconds: float | None = None
    peak_mem_bytes: int | None = None
    peak_vram_mb: float | None = None
    training_share: float | None = None
    log: str = ""
    log_bytes: int | None = None
    log_truncated: bool = False
    limits: dict = field(default_factory=dict)
    seed: int = 0

    def to_json(self) -> dict:
        return to_json(self)

    def get(self, name: str, default=None):
        """The field `name`, read as a dict's key: for callers outside runner/ not yet converted
        (benchmarks/). Code in runner/ reads the attributes."""
        return getattr(self, name, default) if name in self.__dataclass_fields__ else default


KINDS: dict[str, type["Event"]] = {}  # "vram_ceiling" -> VramCeiling, ...


@dataclass(frozen=True, kw_only=True)
class Event(Typed):
    """One line of events.jsonl. Subclasses name their kind (`class X(Event, kind="x")`); the
    ledger stamps `ts`, `tag` and `v` when it writes one."""

    KIND: ClassVar[str] = ""
    ts: float | None = None  # epoch seconds
    tag: str = ""
    v: int = EVENTS_VERSION

    def __init_subclass__(cls, kind: str = "", **kwargs):
        super().__init_subclass__(**kwargs)
        if kind:
            cls.KIND = kind
            KINDS[kind] = cls

    def fields(self) -> dict:
        """The event's own fields as JSON data (the ledger adds ts, tag, event and v)."""
        return {k: v for k, v in to_json(self).items() if k not in ("ts", "tag", "v")}

    def to_json(self) -> dict:
        """The whole line, as events.jsonl holds it."""
        return {"ts": self.ts, "tag": self.tag, "event": self.KIND, "v": self.v, **self.fields()}

    @classmethod
    def from_event(cls, obj: dict):
        """This kind of event from its JSON object (see `parse`)."""
        return parse(cls, obj)


def parse_event(obj) -> Event | None:
    """The event an events.jsonl line's object records; None for a kind this version does not
    know (a foreign line, or a later version's kind among its own).

    Raises:
        ValueError: not an event (no kind), written by a later version of the format, or a field
            missing or of the wrong type; the message names it.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
        raise ValueError("it is not an event (a JSON object with an \"event\" kind)")
    version = obj.get("v", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"v is {_shown(version)}, not a version number")
    if version > EVENTS_VERSION:
        raise ValueError(f"it was written by a later runner (events version {version}; this one reads up to "
                         f"{EVENTS_VERSION})")
    cls = KINDS.get(obj["event"])
    return None if cls is None else parse(cls, {**obj, "v": version})


@dataclass(frozen=True)
class ExperimentRecord(Event, kind="experiment"):
    """One finished experiment: `row` is its results.tsv row, `outcome` how its run came out, `run`
    the engine's record of that run; `runs` the earlier runs of a confirmed one (other seeds)."""

    iteration: int
    commit: str
    row: Row
    outcome: OutcomeStatus
    reason: str = ""
    metrics: Metrics | None = None
    run: RunRecord = field(default_factory=RunRecord)
    hypothesis: str = ""
    usage: dict = field(default_factory=dict)
    parent: str | None = None
    verifies: int | None = None
    runs: tuple[RunRecord, ...] = ()

    @property
    def status(self) -> RowStatus:
        return self.row.status

    @property
    def training_s(self) -> float:
        return (self.metrics.training_seconds if self.metrics else None) or 0.0


@dataclass(frozen=True)
class Start(Event, kind="start"):
    """A session began (`runner start`, with or without --resume)."""

    resume: bool = False
    branch: str = ""
    head: str = ""
    proposer: str = ""
    config: dict = field(default_factory=dict)  # RunConfig.to_dict()
    min_delta: float = 0.0
    workers: int = 1

    def setting(self, name: str, kind: type | tuple[type, ...]):
        """A value of the recorded config, or None when it is absent or not a `kind` (a config
        of another version)."""
        value = self.config.get(name)
        return value if isinstance(value, kind) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class SessionSummary(Event, kind="summary"):
    """A session ended: what it did, and the seconds its duty cycle is computed from."""

    experiments: int = 0
    best_commit: str | None = None
    best_val_bpb: float | None = None
    trajectory: list[str] = field(default_factory=list)
    next_ideas: list[str] = field(default_factory=list)
    usage: dict = field(default_factory=dict)
    wall_s: float | None = None      # None in summaries of versions before the duty cycle was recorded
    training_s: float | None = None
    workers: int = 1
    duty_cycle: float | None = None


@dataclass(frozen=True)
class Stopped(Event, kind="stopped"):
    reason: str
    cap: str | None = None


@dataclass(frozen=True)
class Repaired(Event, kind="repaired"):
    """A torn last line (a write cut by a kill) was trimmed from `file`."""

    file: str
    bytes_cut: int


@dataclass(frozen=True)
class RowRestored(Event, kind="row_restored"):
    commit: str


@dataclass(frozen=True)
class ResetOnResume(Event, kind="reset_on_resume"):
    abandoned: str
    to: str


@dataclass(frozen=True)
class Swept(Event, kind="swept"):
    containers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Lost(Event, kind="lost"):
    """A run lost with its node (a cluster); the experiment ran once more."""

    iteration: int
    commit: str
    run: RunRecord


@dataclass(frozen=True)
class Interrupted(Event, kind="interrupted"):
    """A run, or a proposal (`description`, `usage`), dropped by a stop; `forced`: a second Ctrl-C."""

    iteration: int | None = None
    commit: str | None = None
    run: RunRecord | None = None
    description: str = ""
    usage: dict = field(default_factory=dict)
    forced: bool = False


@dataclass(frozen=True)
class BaselineFailed(Event, kind="baseline_failed"):
    commit: str
    reason: str
    run: RunRecord | None = None


@dataclass(frozen=True)
class VerificationUnavailable(Event, kind="verification_unavailable"):
    """The baseline could not be verified under `verify: auto`: the tag's keeps go unverified."""

    why: str = ""


@dataclass(frozen=True)
class VramCeiling(Event, kind="vram_ceiling"):
    """The default VRAM ceiling (twice the baseline's peak), kept across a resume."""

    gb: float


@dataclass(frozen=True)
class WallLimit(Event, kind="wall_limit"):
    """The deadline experiments run under after the baseline (policy.experiment_wall_limit_s):
    measured once, kept across a resume."""

    baseline_wall_s: float
    s: float


@dataclass(frozen=True)
class Noise(Event, kind="noise"):
    """The baseline's spread over seeds (reruns.noise_floor) and the min_delta it set."""

    n: int
    values: list[float]
    mean: float
    stdev: float
    spread: float
    min_delta: float | None = None


@dataclass(frozen=True)
class NoiseRunFailed(Event, kind="noise_run_failed"):
    attempt: int
    reason: str = ""


@dataclass(frozen=True)
class NoiseFailed(Event, kind="noise_failed"):
    results: int
    attempts: int


@dataclass(frozen=True)
class ProposerErrored(Event, kind="proposer_error"):
    iteration: int
    error: str = ""


@dataclass(frozen=True)
class Refused(Event, kind="refused"):
    """A proposal that was not run (the guard, a seed-only edit, a proposer that choked)."""

    iteration: int
    reason: str
    description: str = ""
    usage: dict = field(default_factory=dict)


@dataclass(frozen=True)
class HarnessError(Event, kind="harness_error"):
    iteration: int
    commit: str
    error: str = ""
    retry_in_s: float | None = None


@dataclass(frozen=True)
class FixFailed(Event, kind="fix_failed"):
    iteration: int
    error: str = ""


@dataclass(frozen=True)
class Confirming(Event, kind="confirming"):
    """A would-be keep runs again with another seed; `values`: its runs so far."""

    iteration: int
    commit: str
    values: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class NearMissConflict(Event, kind="near_miss_conflict"):
    iteration: int
    commit: str


@dataclass(frozen=True)
class NotifyFailed(Event, kind="notify_failed"):
    target: str
    alert: str
    error: str = ""
