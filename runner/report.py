"""`runner report`: the night at a glance, from the ledger alone.

progress.png (every experiment a point, the running best a step line, keeps labelled, as in
autoresearch's analysis notebook) and report.html (self-contained: the plot inlined) with the
keep rate, the top improvements, token usage and cost, and the duty cycle.
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from sandbox.fsafe import open_beneath

from . import ablate
from .ledger import Ledger, RowStatus
from .policy import duty_cycle
from .reruns import load_noise

# USD per million tokens (input, output); a model not listed reports tokens only.
PRICES_PER_MTOK = {
    "claude-opus-4": (15.0, 75.0),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-haiku-4": (1.0, 5.0),
}


@dataclass
class ReportData:
    tag: str
    points: list[dict] = field(default_factory=list)    # iteration, val_bpb, status, description, commit
    keep_rate: float = 0.0
    improvements: list[dict] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None
    model: str | None = None
    duty_cycle: float | None = None
    night_s: float = 0.0          # wall seconds of the sessions that ended with a summary
    training_s: float = 0.0
    wall_s: float = 0.0
    counts: dict = field(default_factory=dict)
    verdicts: dict = field(default_factory=dict)        # verdict -> experiments (verified runs only)
    heldout: dict | None = None  # the best kept experiment's val_bpb and held-out bpb, when the verifier had held-out data
    damaged: list[str] = field(default_factory=list)  # events.jsonl lines the report skipped
    noise: dict | None = None  # the baseline's spread over seeds (min_delta auto), when measured
    ablation: dict | None = None  # `runner ablate`'s last result for this tag


def collect(repo_root: Path, tag: str) -> ReportData:
    """Everything the report shows, read from .autoresearch/<tag>/events.jsonl.

    Raises:
        ValueError: no experiments recorded for `tag`.
    """
    ledger = Ledger(repo_root, tag)
    damaged: list[str] = []
    experiments = ledger.experiments(damaged)  # a report reads what it can, and says what it skipped
    if not experiments:
        raise ValueError(f"no experiments recorded for tag {tag} in {ledger.events_path}: run `runner start --tag {tag}` first")
    data = ReportData(tag, damaged=damaged)
    best = None
    for e in experiments:
        row = e.row
        seeds = [r.get("seed", 0) for r in (*e.runs, e.run) if isinstance(r, dict)]
        data.points.append({"iteration": e.iteration, "val_bpb": row.val_bpb, "status": row.status,
                            "description": row.description, "commit": row.commit, "seeds": seeds})
        if e.status == RowStatus.KEEP:
            if best is not None:
                data.improvements.append({"delta": best - row.val_bpb, "description": row.description,
                                          "commit": row.commit, "val_bpb": row.val_bpb})
            best = row.val_bpb
            held = e.run.get("heldout_val_bpb") if _number(e.run.get("heldout_val_bpb")) else None
            data.heldout = {"val_bpb": row.val_bpb, "heldout_bpb": held, "commit": row.commit} if held is not None else None
        usage = e.usage if isinstance(e.usage, dict) else {}
        data.input_tokens += _number(usage.get("input_tokens"))
        data.output_tokens += _number(usage.get("output_tokens"))
        data.training_s += _number(e.training_s)
        data.wall_s += _number(e.run.get("wall_s"))
        if e.run.get("verdict"):
            data.verdicts[e.run["verdict"]] = data.verdicts.get(e.run["verdict"], 0) + 1
    data.improvements.sort(key=lambda i: i["delta"], reverse=True)
    tried = [p for p in data.points if p["iteration"] > 0]
    data.counts = {s: sum(p["status"] == s for p in tried) for s in RowStatus}
    data.keep_rate = data.counts["keep"] / len(tried) if tried else 0.0
    starts = ledger.events("start")
    if starts:
        cfg = starts[-1].get("config") if isinstance(starts[-1].get("config"), dict) else {}
        data.model = cfg.get("model") if starts[-1].get("proposer") == "claude" else None
    for s in ledger.events("summary"):
        usage = s.get("usage") if isinstance(s.get("usage"), dict) else {}
        data.input_tokens += _number(usage.get("input_tokens"))
        data.output_tokens += _number(usage.get("output_tokens"))
    if data.model:
        price = next((p for prefix, p in PRICES_PER_MTOK.items() if data.model.startswith(prefix)), None)
        if price:
            data.cost_usd = (data.input_tokens * price[0] + data.output_tokens * price[1]) / 1e6
    # The night's duty cycle (policy.duty_cycle), over every session of this tag that ended with
    # a summary: its workers' training seconds over its wall time x workers.
    nights = [e for e in ledger.events("summary") if all(isinstance(e.get(k), (int, float)) for k in ("training_s", "wall_s"))]
    capacity = sum(e["wall_s"] * max(int(e.get("workers") or 1), 1) for e in nights)
    data.night_s = sum(e["wall_s"] for e in nights)
    data.duty_cycle = duty_cycle(sum(e["training_s"] for e in nights), capacity) if nights else None
    try:
        noise = load_noise(ledger)
    except (OSError, ValueError):
        noise = None  # a damaged noise file: the report shows no band
    if isinstance(noise, dict) and isinstance(noise.get("spread"), (int, float)):
        data.noise = {"spread": noise["spread"], "n": noise.get("n")}
    ablation = ablate.load(ledger)
    data.ablation = ablation if isinstance(ablation, dict) and isinstance(ablation.get("ablations"), list) else None
    return data


def _number(value) -> float:
    """A figure from a record written by another version (or damaged): 0 unless a number."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def plot(data: ReportData, path):
    """Draw the run into `path` (a file name or a binary file object), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Crashes and timeouts have no val_bpb (their rows say 0.0): drawn at 0 they would look like
    # the best points, so they are crosses along the top.
    ok = [p for p in data.points if p["status"] != "crash" and p["val_bpb"] > 0]
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    colors = {"keep": "#2a9d3f", "discard": "#9a9a9a"}
    for status in ("discard", "keep"):
        pts = [p for p in ok if p["status"] == status]
        ax.scatter([p["iteration"] for p in pts], [p["val_bpb"] for p in pts], s=36 if status == "keep" else 18,
                   c=colors[status], label=status, zorder=3, alpha=0.9 if status == "keep" else 0.6)
    failed = [p["iteration"] for p in data.points if p not in ok]
    if failed and ok:
        y = max(p["val_bpb"] for p in ok)
        ax.scatter(failed, [y] * len(failed), marker="x", c="#c0392b", label="crash / timeout", zorder=3)
    xs, ys, best = [], [], None
    for p in data.points:
        if p["status"] == "keep":
            best = p["val_bpb"]
        if best is not None:
            xs.append(p["iteration"])
            ys.append(best)
    ax.step(xs, ys, where="post", c="#2a9d3f", lw=1.5, label="running best", zorder=2)
    for p in data.points:
        if p["status"] == "keep":
            # descriptions are untrusted text: `$...$` must print as written, not as mathtext
            ax.annotate(p["description"][:40].replace("$", r"\$"), (p["iteration"], p["val_bpb"]), textcoords="offset points",
                        xytext=(4, 6), fontsize=7, rotation=20, color="#1e6b2d")
    ax.set_xlabel("experiment")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.set_title(f"autoresearch {data.tag}: {len(data.points)} experiments, keep rate {100 * data.keep_rate:.0f}%")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def write_report(repo_root: Path, tag: str, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write progress.png and report.html (default: .autoresearch/<tag>/). Returns both paths."""
    data = collect(repo_root, tag)
    # The default folder is in the (untrusted) repo: files there are opened without following links.
    root = Path(out_dir) if out_dir else Path(repo_root)
    folder = PurePath(".") if out_dir else Ledger(repo_root, tag).dir.relative_to(repo_root)
    root.mkdir(parents=True, exist_ok=True)
    png, html_path = root / folder / "progress.png", root / folder / "report.html"
    with os.fdopen(open_beneath(root, folder / "progress.png", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as f:
        plot(data, f)
    with os.fdopen(open_beneath(root, folder / "report.html", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w") as f:
        f.write(render_html(data, png.read_bytes()))
    return png, html_path


def summary_lines(data: ReportData) -> list[str]:
    lines = [
        f"experiments: {len(data.points)} ({data.counts['keep']} keep, {data.counts['discard']} discard, "
        f"{data.counts['crash']} crash), keep rate {100 * data.keep_rate:.1f}%",
        f"best val_bpb: {min((p['val_bpb'] for p in data.points if p['status'] == 'keep'), default=0):.6f}",
        "accelerator duty cycle: " + ("-" if data.duty_cycle is None else f"{100 * data.duty_cycle:.1f}% of "
                                      f"{data.night_s:.0f}s of night (containers ran {data.wall_s:.0f}s, "
                                      f"training {data.training_s:.0f}s)"),
        f"tokens: {data.input_tokens:,} in, {data.output_tokens:,} out"
        + ("" if data.cost_usd is None else f", about ${data.cost_usd:.2f} ({data.model})"),
        "verified: " + (", ".join(f"{n} {v}" for v, n in sorted(data.verdicts.items())) or "none (verify off or unavailable)"),
    ]
    if data.heldout:  # the gap a model fitted to the validation split shows (verify_data)
        h = data.heldout
        lines.append(f"held-out: best kept {h['commit']} val_bpb {h['val_bpb']:.6f}, held-out {h['heldout_bpb']:.6f} "
                     f"(gap {h['heldout_bpb'] - h['val_bpb']:+.6f})")
    keeps = [p for p in data.points if p["status"] == "keep" and p["iteration"] > 0]
    confirmed = [p for p in keeps if len(p.get("seeds") or ()) > 1]
    lines.append(f"keeps: {len(confirmed)} of {len(keeps)} confirmed over several seeds"
                 + "".join(f"; {p['commit']} seeds {p['seeds']}" for p in confirmed[:5]))
    if data.noise:
        lines.append(f"noise band: val_bpb spread {data.noise['spread']:.6f} over {data.noise['n']} baseline runs (seeds)")
    if data.ablation:
        for a in data.ablation["ablations"]:
            if isinstance(a, dict):
                worth = a.get("delta")
                lines.append(f"ablation: {str(a.get('commit', ''))[:7]} {a.get('verdict')} "
                             + ("" if not isinstance(worth, (int, float)) else f"(reverting it costs {worth:+.6f}) ")
                             + str(a.get("description", "")))
    lines += [f"skipped: {why}" for why in data.damaged]
    return lines


def render_html(data: ReportData, png: bytes) -> str:
    rows = "".join(
        f"<tr><td>{i + 1}</td><td>{d['delta']:.6f}</td><td>{d['val_bpb']:.6f}</td><td><code>{html.escape(d['commit'])}</code></td>"
        f"<td>{html.escape(d['description'])}</td></tr>" for i, d in enumerate(data.improvements[:10]))
    stats = "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(data))
    img = base64.b64encode(png).decode()
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>autoresearch {html.escape(data.tag)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>autoresearch {html.escape(data.tag)}</h1>
<ul>{stats}</ul>
<img alt="progress" src="data:image/png;base64,{img}">
<h2>Top improvements</h2>
<table><tr><th>#</th><th>delta</th><th>val_bpb</th><th>commit</th><th>description</th></tr>{rows}</table>
</body></html>
"""
