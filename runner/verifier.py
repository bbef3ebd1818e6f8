"""The number that decides: a finished run's exported model, evaluated again by trusted code.

Contract (what `Verifier.verify` promises, and what it takes as hostile):
- It runs sandbox/hooks/verify.py in a fresh container of the run's own image, with the run's
  limits (its deadline stretched by what the run itself took: verifier_limits), no network, no train.py code, the collected export read-only at /verify, and the
  held-out data (verify_data) read-only when there is some: experiments never get that mount.
- The collected files are hostile (the export hook ran inside train.py's process); the verifier
  loads no pickle and runs only pure graphs (see verify.py). Its output is hostile too, since it
  shares a stream with the evaluated program: the runner makes a secret after the run has ended,
  gives it to this one verifier, and accepts exactly one report line carrying it, from a
  verifier that exited 0 on its own. Anything else is `unverified`.
- The verdict and the verified val_bpb replace the run's outcome (summary.apply_verification);
  only `ok` can be kept. What the report says in words is sanitised before it is stored.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from typing import TYPE_CHECKING

from sandbox.hooks import verify_protocol as protocol
from sandbox.spec import Limits, Mount

from .summary import STATUS_OK, apply_verification

if TYPE_CHECKING:
    from .engine import Engine, ExperimentRun, Slot

VERIFIER = "/opt/autoresearch-hooks/verify.py"  # in every trainer image (Dockerfile.trainer)
VERIFY_MOUNT = "/verify"                         # the collected export, read-only
# The verifier loads the program, evaluates it again with probes folded in, and evaluates the
# held-out data: about one to two of the run's own evaluations. On a loaded host it slows as the
# run did, so its deadline grows by this many times the run's wall time (bounded by the run's own
# deadline, so a slow train.py buys its verifier at most this factor of it).
VERIFY_WALL_FACTOR = 2.0


def verifier_limits(limits: Limits, run_wall_s: float) -> Limits:
    """The run's limits, with the deadline VERIFY_WALL_FACTOR x its wall time longer (and not the
    experiments' measured wall limit, which is a training run's)."""
    return dataclasses.replace(limits, wall_limit_s=None,
                               startup_grace_s=limits.startup_grace_s + VERIFY_WALL_FACTOR * max(run_wall_s, 0.0))


def export_failure(output: str) -> str:
    """Why the export hook could not export, as it said in the run's output (its last word on it);
    "" when it said nothing. The run's output is hostile, but this only ever explains a run that
    is unverified whatever it says."""
    head = protocol.EXPORT_FAILED_MARK + " "
    said = [line[len(head):] for line in output.splitlines() if line.startswith(head)]
    return said[-1].strip() if said else ""


class Verifier:
    """Verifies finished runs of one engine (its backend, limits and held-out data)."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.cfg = engine.cfg

    def verify(self, run: "ExperimentRun", tag: str, iteration: int = 0, stop: threading.Event | None = None,
               slot: "Slot | None" = None) -> "ExperimentRun":
        """`run` with its verdict (unchanged when it did not end with a result).

        Raises:
            SandboxError: the harness failed (never the run's fault).
        """
        if run.outcome.status != STATUS_OK:
            return run
        t0 = time.monotonic()
        report = None
        if run.result.collected:
            report = self._report(run, tag, iteration, stop, slot)
        elif why := export_failure(run.result.output_tail):
            report = protocol.VerifyReport.unverified(f"the export failed: {why}")
        outcome = apply_verification(run.outcome, report, self.cfg.verify_tolerance)
        return dataclasses.replace(run, outcome=outcome, verify_s=round(time.monotonic() - t0, 3),
                                   verify_phases=report.seconds if report is not None else None)

    def _report(self, run: "ExperimentRun", tag: str, iteration: int, stop, slot) -> protocol.VerifyReport:
        engine = self.engine
        folder = run.result.log_path.with_suffix(".verify")
        heldout, env = engine.specs.heldout(writable=False)
        secret = protocol.new_secret()  # made now: nothing the run wrote can hold it
        env.update({protocol.ARGS_ENV: json.dumps(self.cfg.verify_args), protocol.SECRET_ENV: secret,
                    protocol.OPS_ENV: ",".join(self.cfg.verify_ops)})
        log = folder.with_suffix(".verify.log")
        # a verifier lost with its node is run again: its verdict must not be "unverifiable"
        result, _ = engine.run_spec(lambda: engine.spec(
            run.image.ref, ("python", "-I", VERIFIER, VERIFY_MOUNT), tag, run.commit, iteration, engine.devices(slot),
            verifier_limits(run.limits, run.result.wall_s), log, mounts=(Mount(folder, VERIFY_MOUNT, True), *heldout),
            export=True, env=env), stop)
        if result.reason or result.exit_code != 0:
            return protocol.VerifyReport.unverified(
                f"the verifier did not finish cleanly ({result.reason or 'exit ' + str(result.exit_code)}); read {log}")
        return protocol.parse_report(result.output_tail, secret)
