"""Trusted runs: the repo's own fixed code (prepare.py, the hub fetch), run with the network on
and the caches writable, as the invoking user. Never an experiment: train.py does not run here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from sandbox import naming
from sandbox.spec import RunResult

from . import hub

if TYPE_CHECKING:
    from .engine import Engine


def first_failure(results: list[RunResult]) -> RunResult:
    """The run that tells: the first that failed, else the first."""
    return next((r for r in results if r.reason or r.exit_code), results[0])


class TrustedRuns:
    """prepare.py and the hub fetch of one engine's repo (its images, limits, specs and executor)."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.cfg = engine.cfg

    def _run(self, command: tuple[str, ...], log_path: Path, heldout: bool = False) -> list[RunResult]:
        """Run `command` in the image of the repo's head (SpecFactory.trusted says how).

        Returns one result per node (one on a single host), each with the log it wrote: on a
        cluster every node's log has a name of its own beside `log_path`."""
        engine = self.engine
        head = engine.repo.head().sha
        limits = engine.limits()
        built = engine.experiment_image(head, naming.PREPARE_TAG, limits, "", kind=naming.KIND_PREPARE)
        spec = engine.specs.trusted(built.ref, command, head, limits, log_path, user=f"{os.getuid()}:{os.getgid()}",
                                    hf_endpoint=os.environ.get("HF_ENDPOINT"), heldout=heldout)
        return engine.executor.run_on_every_node(spec)  # on a cluster every node fills its own caches

    def prepare_data(self, log_path: Path) -> RunResult:
        """Run the repo's own prepare.py with the data cache writable and the network on, then,
        when it succeeded, put runner.yaml's `heldout:` files into verify_data (on this host).

        Raises:
            HeldoutError: a held-out file could not be made (runner/heldout.py).
        """
        from . import heldout

        Path(self.cfg.data_dir).mkdir(parents=True, exist_ok=True)
        if self.cfg.verify_data:
            Path(self.cfg.verify_data).expanduser().mkdir(parents=True, exist_ok=True)
        result = first_failure(self._run(("python", "prepare.py"), log_path, heldout=True))
        if result.exit_code == 0 and not result.reason:
            heldout.fill(self.cfg, self.engine.progress)  # after prepare.py: a tokenizer it made is copied
        return result

    def fetch_hub(self, log_path: Path) -> tuple[RunResult | None, hub.FetchReport]:
        """Download the Hub repos the code names (and hf_prefetch) into the hub cache.

        Returns:
            (the fetch run, or None when there was nothing to fetch; what it fetched and what failed)
        """
        refs = self.engine.hub_refs()
        if not refs:
            return None, hub.FetchReport([], [], [])
        Path(self.cfg.hf_cache).mkdir(parents=True, exist_ok=True)
        payload = json.dumps([r.to_dict() for r in refs])
        results = self._run(("python", "-I", "-c", hub.FETCH_SCRIPT, payload), log_path)
        explicit = {hub.parse_prefetch(e).label for e in self.cfg.hf_prefetch}
        # Each node's own log says what that node fetched: a repo missing on one is missing.
        reports = [hub.read_fetch_report(r.log_path.read_text(errors="replace"), explicit) for r in results]
        fetched = [label for label in reports[0].fetched if all(label in r.fetched for r in reports)]
        merged = hub.FetchReport(fetched, list(dict.fromkeys(f for r in reports for f in r.failed)),
                                 list(dict.fromkeys(f for r in reports for f in r.fatal)))
        return first_failure(results), merged
