"""The verified metric's protocol, in one place: what the export hook writes, what the verifier
reads and reports, and how the runner accepts a report. Standard library only: the root-owned
hook and verifier in the trainer image import it as `verify_protocol`, the runner as
`sandbox.hooks.verify_protocol`.

Trust runs one way. The hook runs inside train.py's process, so everything it writes is hostile
input to the verifier. The verifier's output shares a stream with whatever the evaluated program
could print, so a report counts only when it carries the secret the runner made for that one
verification, after the run had ended (no exported graph can contain it), and only when the
verifier exited cleanly.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from enum import Enum

# --- what the export hook leaves in the experiment's /out tmpfs -----------------------------

EXPORT_DIR = "/out/verify"
EXPORT_MARK = "AUTORESEARCH_VERIFY_EXPORTED"   # printed by the hook once its files are written
EXPORT_FAILED_MARK = "AUTORESEARCH_VERIFY_FAILED"  # printed by the hook, with why, when it could not export
MODEL_FILE = "model.pt2"                        # torch.export archive (no pickle is ever loaded from it)
CALL_FILE = "call.json"                         # the evaluation call's plain arguments
EXPORT_FILES = (MODEL_FILE, CALL_FILE)
COLLECTED_FILE = ".collected"                   # the runner's word to the hook that it may exit
# A model the evaluation gives targets (a loss per position) is exported, and scored, by its logits.
LOGITS_NEEDED = ("the evaluation gives the model targets, so the model called with the token ids alone must return "
                 "logits (batch, time, vocabulary), as autoresearch's model(x) does: the verifier computes the loss "
                 "from them, never trusting a loss the model states")

# --- the environment of the hook and the verifier --------------------------------------------

TARGET_ENV = "AUTORESEARCH_VERIFY_TARGET"      # module.function of the repo's evaluation
DIR_ENV = "AUTORESEARCH_VERIFY_DIR"            # where the hook writes
ARGS_ENV = "AUTORESEARCH_VERIFY_ARGS"          # runner.yaml's verify_args, as JSON
OPS_ENV = "AUTORESEARCH_VERIFY_OPS"            # extra operator namespaces runner.yaml allows, comma-separated
SECRET_ENV = "AUTORESEARCH_VERIFY_SECRET"      # this verification's secret; the verifier removes it at start
HELDOUT_ENV = "AUTORESEARCH_HELDOUT_DIR"       # the held-out data, laid out like the data cache

# --- the report -------------------------------------------------------------------------------

REPORT_PREFIX = "VERIFY"
SECRET_CHARS = 32                               # hex characters of a secret
_SECRET = re.compile(r"[0-9a-f]{%d}" % SECRET_CHARS)


class Verdict(str, Enum):
    """What the verifier, then the runner, concluded. Only OK can be kept."""

    OK = "ok"                       # trusted code computed the number and every probe passed
    UNVERIFIED = "unverified"       # nothing trustworthy to evaluate, or the verifier did not finish cleanly
    FORGED = "forged"               # the run's own number disagrees with the verified one
    NONCAUSAL = "noncausal"         # outputs change with inputs after their position, or with other rows
    UNNORMALISED = "unnormalised"   # (older verifiers) a loss model's implied probabilities summed over 1
    REFUSED = "refused"             # the exported archive or graph is not one the verifier runs
    OVERFIT = "overfit"             # the val gain is not matched on the held-out data (decided by the runner)
    SEED_PINNED = "seed_pinned"     # its runs agree exactly under the runner's different seeds (decided by the runner)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class VerifyReport:
    """One verification's findings, as the verifier prints them and the runner reads them."""

    verdict: Verdict
    why: str = ""                              # for every verdict but ok
    val_bpb: float | None = None               # the repo's evaluation of the exported program
    heldout_bpb: float | None = None           # the same on the held-out data, when there is some
    heldout_error: str | None = None           # why the held-out evaluation failed, when it did
    probed_positions: int = 0                  # positions the causality probe compared
    normalised_positions: int = 0              # (older verifiers, whose reports images still carry: their
    probability_mass: float | None = None      # normalisation probe's positions and largest sum; unset now)
    seconds: dict | None = None                # where the verifier's time went: {phase: seconds}
    margin_bpb: float | None = None            # what reading ahead inside the probe's tolerance could gain
                                               # (in the number's units): a keep must beat the best by more

    def to_line(self, secret: str) -> str:
        body = {k: (v.value if isinstance(v, Verdict) else v) for k, v in asdict(self).items()}
        return f"{REPORT_PREFIX} {secret} {json.dumps(body, allow_nan=False)}"

    @classmethod
    def unverified(cls, why: str) -> "VerifyReport":
        return cls(Verdict.UNVERIFIED, why=why)


def new_secret() -> str:
    import secrets

    return secrets.token_hex(SECRET_CHARS // 2)


def parse_report(output: str, secret: str) -> VerifyReport:
    """The one report in `output` that carries `secret`, checked field by field.

    Returns an unverified report when there is none, more than one, or one that does not parse:
    nothing the evaluated program prints can stand in for the verifier's own line.
    """
    if not _SECRET.fullmatch(secret or ""):
        raise ValueError("a verification secret is 32 lowercase hex characters")
    head = f"{REPORT_PREFIX} {secret} "
    lines = [line[len(head):] for line in output.splitlines() if line.startswith(head)]
    if len(lines) != 1:
        return VerifyReport.unverified(f"the verifier printed {len(lines)} reports carrying its secret, not one")
    try:
        body = json.loads(lines[0])
        known = {f.name for f in fields(VerifyReport)}
        if not isinstance(body, dict) or set(body) - known:
            raise ValueError("unexpected fields")
        report = VerifyReport(**body)
        verdict = Verdict(report.verdict)
        for name in ("val_bpb", "heldout_bpb", "probability_mass", "margin_bpb"):
            value = getattr(report, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(name)
        for name in ("probed_positions", "normalised_positions"):
            if not isinstance(getattr(report, name), int):
                raise ValueError(name)
        if report.seconds is not None and not (isinstance(report.seconds, dict) and all(
                isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v) for k, v in report.seconds.items())):
            raise ValueError("seconds")
        for name in ("why", "heldout_error"):
            value = getattr(report, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(name)
    except (ValueError, TypeError) as exc:
        return VerifyReport.unverified(f"the verifier's report does not parse ({exc})")
    return VerifyReport(**{**body, "verdict": verdict})
