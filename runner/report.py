"""`runner report`: the night at a glance, from the ledger alone.

progress.png (every experiment a point, the running best a step line, keeps labelled, as in
autoresearch's analysis notebook) and report.html (self-contained: the plot inlined, no script
or style from elsewhere) with the counts, the duty cycle, tokens and cost, the top improvements
and every experiment in one table (sortable by clicking a header) with a link to its log.
`watch` rewrites both as the night goes on.
"""

from __future__ import annotations

import base64
import html
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Callable
from urllib.parse import quote

from sandbox.fsafe import open_beneath

from . import ablate
from .config import DEFAULT_PRICES_PER_MTOK
from .ledger import Ledger
from .policy import StatusCounts, nights_duty_cycle, status_counts
from .records import ExperimentRecord, RowStatus, RunRecord, SessionSummary, Start
from .reruns import load_noise
from .spend import spent

WATCH_POLL_S = 5.0  # `runner report --watch`: how often events.jsonl is looked at, and the page reloads
LABEL_MAX_CHARS = 40  # a keep's label on the plot
LABEL_ROTATION_DEG = 20  # keeps' labels slant upwards, so that neighbours overlap less


@dataclass
class ReportData:
    tag: str
    # every experiment: iteration, val_bpb, status, description, commit, seeds, verdict, heldout_bpb,
    # wall_s (all its runs), logs ([(label, path)], one per run)
    points: list[dict] = field(default_factory=list)
    improvements: list[dict] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None
    model: str | None = None
    duty_cycle: float | None = None
    night_s: float = 0.0          # wall seconds of the sessions that ended with a summary
    training_s: float = 0.0
    wall_s: float = 0.0
    counts: StatusCounts = field(default_factory=StatusCounts)
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
    events = ledger.read(damaged)  # a report reads what it can, and says what it skipped
    experiments = [e for e in events if isinstance(e, ExperimentRecord)]
    if not experiments:
        raise ValueError(f"no experiments recorded for tag {tag} in {ledger.events_path}: run `runner start --tag {tag}` first")
    data = ReportData(tag, damaged=damaged)
    best = None
    for e in experiments:
        row = e.row
        runs = (*e.runs, e.run)
        held = e.run.heldout_val_bpb or None
        data.points.append({"iteration": e.iteration, "val_bpb": row.val_bpb, "status": row.status,
                            "description": row.description, "commit": row.commit, "seeds": [r.seed for r in runs],
                            "verdict": str(e.run.verdict or ""), "heldout_bpb": held,
                            "wall_s": sum(r.wall_s for r in runs),
                            "logs": [(f"seed {r.seed}" if r.seed else "log", _log_path(ledger, e, r)) for r in runs]})
        if e.status == RowStatus.KEEP:
            if best is not None:
                data.improvements.append({"delta": best - row.val_bpb, "description": row.description,
                                          "commit": row.commit, "val_bpb": row.val_bpb})
            best = row.val_bpb
            data.heldout = {"val_bpb": row.val_bpb, "heldout_bpb": held, "commit": row.commit} if held is not None else None
        data.training_s += e.training_s
        data.wall_s += e.run.wall_s
        if e.run.verdict:
            data.verdicts[str(e.run.verdict)] = data.verdicts.get(str(e.run.verdict), 0) + 1
    data.improvements.sort(key=lambda i: i["delta"], reverse=True)
    data.counts = status_counts((p["iteration"], p["status"]) for p in data.points)
    spend = spent(events)
    data.input_tokens, data.output_tokens = spend.input_tokens, spend.output_tokens
    starts = [e for e in events if isinstance(e, Start)]
    model = starts[-1].setting("model", str) if starts else None
    if spend.total_tokens and model:
        data.model, data.cost_usd = model, spend.cost_usd(model, starts[-1].setting("prices", dict) or DEFAULT_PRICES_PER_MTOK)
    # The night's duty cycle (policy.nights_duty_cycle), over every session of this tag that
    # ended with a summary: its workers' training seconds over its wall time x workers.
    nights = [e for e in events if isinstance(e, SessionSummary) and e.training_s is not None and e.wall_s is not None]
    data.night_s = sum(e.wall_s for e in nights)
    data.duty_cycle = nights_duty_cycle((e.training_s, e.wall_s, e.workers or 1) for e in nights)
    try:
        noise = load_noise(ledger)
    except (OSError, ValueError):
        noise = None  # a damaged noise file: the report shows no band
    if isinstance(noise, dict) and isinstance(noise.get("spread"), (int, float)):
        data.noise = {"spread": noise["spread"], "n": noise.get("n")}
    ablation = ablate.load(ledger)
    data.ablation = ablation if isinstance(ablation, dict) and isinstance(ablation.get("ablations"), list) else None
    return data


def _log_path(ledger: Ledger, e: ExperimentRecord, run: RunRecord) -> Path:
    """A run's log, in the tag's runs folder (by the name the run recorded; the folder is the
    ledger's, wherever the repo has moved since)."""
    recorded = PurePath(run.log).name
    return ledger.runs_dir / recorded if recorded else ledger.log_path(e.iteration, e.commit, run.seed)


def figure(data: ReportData):
    """The progress plot as a matplotlib Figure: x ticks are whole experiment numbers, and each
    keep's label is placed where it stays inside the axes (leftwards at the right edge, below
    at the top) when any placement does."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    # Crashes and timeouts have no val_bpb (their rows say 0.0): drawn at 0 they would look like
    # the best points, so they are crosses along the top.
    ok = [p for p in data.points if p["status"] != RowStatus.CRASH and p["val_bpb"] > 0]
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    colors = {RowStatus.KEEP: "#2a9d3f", RowStatus.DISCARD: "#9a9a9a"}
    for status in (RowStatus.DISCARD, RowStatus.KEEP):
        pts = [p for p in ok if p["status"] == status]
        ax.scatter([p["iteration"] for p in pts], [p["val_bpb"] for p in pts], s=36 if status == RowStatus.KEEP else 18,
                   c=colors[status], label=str(status), zorder=3, alpha=0.9 if status == RowStatus.KEEP else 0.6)
    failed = [p["iteration"] for p in data.points if p not in ok]
    if failed and ok:
        y = max(p["val_bpb"] for p in ok)
        ax.scatter(failed, [y] * len(failed), marker="x", c="#c0392b", label="crash / timeout", zorder=3)
    xs, ys, best = [], [], None
    for p in data.points:
        if p["status"] == RowStatus.KEEP:
            best = p["val_bpb"]
        if best is not None:
            xs.append(p["iteration"])
            ys.append(best)
    ax.step(xs, ys, where="post", c="#2a9d3f", lw=1.5, label="running best", zorder=2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.margins(x=0.04, y=0.12)
    labels = []
    for p in data.points:
        if p["status"] == RowStatus.KEEP:
            # descriptions are untrusted text: `$...$` must print as written, not as mathtext
            text = p["description"][:LABEL_MAX_CHARS].replace("$", r"\$")
            labels.append(ax.annotate(text, (p["iteration"], p["val_bpb"]), textcoords="offset points", xytext=(4, 5), ha="left", va="bottom",
                                      rotation=LABEL_ROTATION_DEG, rotation_mode="anchor", fontsize=7, color="#1e6b2d"))
    ax.set_xlabel("experiment")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.set_title(f"autoresearch {data.tag}: {data.counts}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    # Each label takes the first of these placements that keeps it inside the axes: up and to the
    # right; up and to the left (the last keeps'); below, to the right; below, to the left.
    fig.canvas.draw()
    box = ax.get_window_extent()
    placements = [("left", "bottom", LABEL_ROTATION_DEG, (4, 5)), ("right", "bottom", -LABEL_ROTATION_DEG, (-4, 5)),
                  ("left", "top", -LABEL_ROTATION_DEG, (4, -5)), ("right", "top", LABEL_ROTATION_DEG, (-4, -5))]
    for label in labels:
        for ha, va, rotation, offset in placements:
            label.set(ha=ha, va=va, rotation=rotation)
            label.xyann = offset
            extent = label.get_window_extent()
            if box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1:
                break
    return fig


def plot(data: ReportData, path):
    """Draw the run into `path` (a file name or a binary file object), as PNG."""
    import matplotlib.pyplot as plt

    fig = figure(data)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def write_report(repo_root: Path, tag: str, out_dir: Path | None = None,
                 refresh_s: float | None = None) -> tuple[Path, Path]:
    """Write progress.png and report.html (default: .autoresearch/<tag>/). Returns both paths.

    Args:
        refresh_s: the page reloads itself this often (`--watch`); None = a page that stays.

    Raises:
        ValueError: no experiments recorded for `tag` (see collect).
    """
    data = collect(repo_root, tag)
    # The default folder is in the (untrusted) repo: files there are opened without following links.
    root = Path(out_dir) if out_dir else Path(repo_root)
    folder = PurePath(".") if out_dir else Ledger(repo_root, tag).dir.relative_to(repo_root)
    root.mkdir(parents=True, exist_ok=True)
    png, html_path = root / folder / "progress.png", root / folder / "report.html"
    with os.fdopen(open_beneath(root, folder / "progress.png", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as f:
        plot(data, f)
    page = render_html(data, png.read_bytes(), html_path.parent, refresh_s)
    with os.fdopen(open_beneath(root, folder / "report.html", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w") as f:
        f.write(page)
    return png, html_path


def watch(repo_root: Path, tag: str, out_dir: Path | None = None, poll_s: float = WATCH_POLL_S,
          stop: threading.Event | None = None, say: Callable[[str], None] = print) -> None:
    """Rewrite the report whenever events.jsonl changes (looked at every `poll_s`), the page
    reloading itself as often, until `stop` is set (or KeyboardInterrupt). Before the first
    experiment is recorded it waits, and says so once."""
    stop = stop or threading.Event()
    events = Ledger(repo_root, tag).events_path
    seen, waiting_said = None, False
    while not stop.is_set():
        try:
            st = events.stat()
            state = (st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            state = None
        if state is not None and state != seen:
            try:
                png, page = write_report(repo_root, tag, out_dir, refresh_s=poll_s)
                seen = state
                say(f"{time.strftime('%H:%M:%S')} wrote {page}")
            except ValueError:
                pass  # nothing recorded yet
        if seen is None and not waiting_said:
            say(f"waiting for the first experiment of {tag} in {events}")
            waiting_said = True
        stop.wait(poll_s)


def summary_lines(data: ReportData) -> list[str]:
    lines = [
        f"experiments: {data.counts}",
        f"best val_bpb: {min((p['val_bpb'] for p in data.points if p['status'] == RowStatus.KEEP), default=0):.6f}",
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
    keeps = [p for p in data.points if p["status"] == RowStatus.KEEP and p["iteration"] > 0]
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


# Sorting by a header's column: numbers (th data-num) as numbers, an empty key last; the rest as text.
_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
  const up = th.dataset.dir !== 'up'; th.dataset.dir = up ? 'up' : 'down';
  const key = r => { const v = r.cells[col].dataset.v;
    return th.hasAttribute('data-num') ? (v === '' ? Infinity : Number(v)) : v.toLowerCase(); };
  rows.sort((a, b) => { const x = key(a), y = key(b); return (x > y) - (x < y); });
  if (!up) rows.reverse();
  rows.forEach(r => body.appendChild(r));
}));
"""


def _cell(shown: str, sort_key=None) -> str:
    """One table cell: `shown` escaped, with the key clicking its header sorts by (default: itself)."""
    key = shown if sort_key is None else sort_key
    return f'<td data-v="{html.escape(str(key))}">{html.escape(shown)}</td>'


def _experiment_rows(data: ReportData, html_dir: Path | None) -> str:
    out = []
    for p in data.points:
        val = "-" if p["status"] == RowStatus.CRASH else f"{p['val_bpb']:.6f}"
        held = "-" if p["heldout_bpb"] is None else f"{p['heldout_bpb']:.6f}"
        hrefs = [(label, quote(os.path.relpath(path, html_dir) if html_dir else str(path))) for label, path in p["logs"]]
        links = " ".join(f'<a href="{html.escape(href)}">{html.escape(label)}</a>' for label, href in hrefs)
        out.append(
            f'<tr class="{html.escape(p["status"])}" data-iteration="{p["iteration"]}">'
            + _cell(str(p["iteration"]), p["iteration"])
            + f'<td data-v="{html.escape(p["commit"])}"><code>{html.escape(p["commit"])}</code></td>'
            + _cell(p["status"]) + _cell(val, p["val_bpb"] if p["status"] != RowStatus.CRASH else "")
            + _cell(p["verdict"] or "-") + _cell(held, "" if p["heldout_bpb"] is None else p["heldout_bpb"])
            + _cell(f"{p['wall_s']:.0f}", p["wall_s"]) + _cell(p["description"]) + f"<td>{links}</td></tr>")
    return "\n".join(out)


def render_html(data: ReportData, png: bytes, html_dir: Path | None = None, refresh_s: float | None = None) -> str:
    """report.html: self-contained. Every string from the ledger (descriptions are an LLM's words)
    is escaped. Log links are relative to `html_dir`, where the page is written."""
    top = "".join(
        f"<tr><td>{i + 1}</td><td>{d['delta']:.6f}</td><td>{d['val_bpb']:.6f}</td><td><code>{html.escape(d['commit'])}</code></td>"
        f"<td>{html.escape(d['description'])}</td></tr>" for i, d in enumerate(data.improvements[:10]))
    stats = "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(data))
    img = base64.b64encode(png).decode()
    refresh = "" if refresh_s is None else f'<meta http-equiv="refresh" content="{max(1, round(refresh_s))}">'
    numeric = ("#", "val_bpb", "held-out bpb", "seconds")
    headers = "".join(f"<th{' data-num' if h in numeric else ''}>{h}</th>" for h in (
        "#", "commit", "status", "val_bpb", "verdict", "held-out bpb", "seconds", "description", "log"))
    return f"""<!doctype html>
<html><head><meta charset="utf-8">{refresh}<title>autoresearch {html.escape(data.tag)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border-bottom:1px solid #ddd;padding:3px 9px;text-align:left;font-size:14px}}
th{{background:#f4f4f4}}table.sortable th{{cursor:pointer;user-select:none}}table.sortable th:hover{{background:#e8e8e8}}
tr.keep td{{background:#eef8ef}}tr.crash td{{color:#a33}}code{{font-size:13px}}img{{max-width:100%}}</style></head><body>
<h1>autoresearch {html.escape(data.tag)}</h1>
<ul>{stats}</ul>
<img alt="progress" src="data:image/png;base64,{img}">
<h2>Top improvements</h2>
<table><tr><th>#</th><th>delta</th><th>val_bpb</th><th>commit</th><th>description</th></tr>{top}</table>
<h2>Every experiment</h2>
<p>Click a column's header to sort by it (again to reverse).</p>
<table class="sortable"><thead><tr>{headers}</tr></thead><tbody>
{_experiment_rows(data, html_dir)}
</tbody></table>
<script>{_SORT_JS}</script>
</body></html>
"""
