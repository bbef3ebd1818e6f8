"""Render a report.html and take its screenshot (docs/report.png in the README).

    .venv/bin/python scripts/report_screenshot.py                      # a made-up night, written to a temp dir
    .venv/bin/python scripts/report_screenshot.py --repo R --tag T     # a real night's report

It writes the report with `runner report`'s own code, then asks headless Chromium
(`apt-get install chromium`) for a screenshot of the page. The made-up night goes through the
ledger's own writer, so the page is what a night of that shape would show.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runner.ledger import ExperimentRecord, Ledger, Row  # noqa: E402
from runner.report import write_report  # noqa: E402

WINDOW = "1280,1600"        # pixels: width, height of the screenshot
DEMO_EXPERIMENTS = 30       # experiments after the baseline in the made-up night
DEMO_SEED = 7
TRAINING_S = 300.0          # seconds: autoresearch's TIME_BUDGET
IDEAS = ["raise the learning rate to 0.04", "depth 8 -> 10", "warmup 200 steps", "weight decay 0.1 -> 0.05",
         "rotary base 10k -> 50k", "batch 32 -> 48", "SwiGLU MLP", "tie embeddings", "QK-norm", "cosine -> linear decay",
         "muon momentum 0.95", "dropout 0.0", "grad clip 1.0", "larger vocab head lr", "value embeddings"]


def demo_night(repo: Path, tag: str) -> None:
    """A night of DEMO_EXPERIMENTS experiments in `repo`'s ledger: keeps, discards, a few crashes."""
    rng = random.Random(DEMO_SEED)
    ledger = Ledger(repo, tag)
    ledger.open()
    ledger.event("start", resume=False, proposer="claude", workers=1,
                 config={"model": "claude-sonnet-4-5", "max_cost_usd": 10.0})
    best = 1.0123
    for i in range(DEMO_EXPERIMENTS + 1):
        commit = f"{rng.getrandbits(28):07x}"
        crash = i > 0 and rng.random() < 0.12
        val = 0.0 if crash else (best if i == 0 else best + rng.gauss(0.002, 0.006))
        status = "keep" if i == 0 or (not crash and val < best) else "crash" if crash else "discard"
        best = val if status == "keep" else best
        description = "baseline" if i == 0 else rng.choice(IDEAS) + (" [exit_code]" if crash else "")
        log = ledger.log_path(i, commit)
        log.write_text(f"step 00953 (100.0%) | loss: {3.1 - i / 100:.4f}\n---\nval_bpb:          {val:.6f}\n")
        run = {"wall_s": 0 if crash else TRAINING_S + rng.uniform(20, 40), "verdict": "" if crash else "ok",
               "heldout_val_bpb": None if crash else val + rng.uniform(0.001, 0.004), "log": str(log), "seed": 0,
               "training_seconds": None if crash else TRAINING_S}
        ledger.record(ExperimentRecord(
            iteration=i, commit=commit, row=Row(commit, round(val, 6), 0.0 if crash else 44.2, status, description),
            outcome="crash" if crash else "ok", reason="exit_code" if crash else "", run=run,
            metrics=None if crash else {"val_bpb": val, "training_seconds": TRAINING_S},
            usage={} if i == 0 else {"input_tokens": rng.randint(40_000, 90_000), "output_tokens": rng.randint(2_000, 6_000)}))
    wall_s = (DEMO_EXPERIMENTS + 1) * (TRAINING_S + 60)
    ledger.event("summary", wall_s=wall_s, training_s=TRAINING_S * DEMO_EXPERIMENTS * 0.9, workers=1, usage={})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, help="a research repo with a night in .autoresearch/ (default: a made-up night)")
    parser.add_argument("--tag", default="mar5", help="the night's tag")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "report.png", help="the screenshot to write")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("error: no chromium on PATH: apt-get install chromium", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        repo = args.repo
        if repo is None:
            repo = Path(tmp) / "night"
            repo.mkdir()
            demo_night(repo, args.tag)
        _, page = write_report(repo, args.tag)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--screenshot={args.out.resolve()}", f"--window-size={WINDOW}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
