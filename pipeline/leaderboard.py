"""The leaderboard: variants × tasks from lm-eval results files, with deltas against the baseline.

Written by the evaluate stage (leaderboard.md / .html / .png) and by `omp leaderboard`, which can
also gather the results of several DVC experiments (or result directories) into one table.
"""

from __future__ import annotations

import html
import json
import subprocess
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.io import atomic_write_bytes, atomic_write_text, read_json
from pipeline.log import status

BASELINE = "pretrain"
# The one number shown per task, in order of preference; lower is better only for bits_per_byte.
PRIMARY = ("bits_per_byte", "acc", "exact_match")
LOWER_IS_BETTER = {"bits_per_byte", "byte_perplexity", "word_perplexity"}


def primary_metric(task_result: dict) -> tuple[str, float] | None:
    for m in PRIMARY:
        v = task_result.get(f"{m},none")
        if isinstance(v, (int, float)):
            return m, float(v)
    return None


def table(results: dict[str, dict]) -> tuple[list[str], dict[str, dict[str, tuple[str, float]]]]:
    """(tasks, {variant: {task: (metric, value)}}) over every task any variant has."""
    cells = {}
    for variant, res in results.items():
        row = {}
        for task, tr in (res.get("results") or {}).items():
            pm = primary_metric(tr)
            if pm:
                row[task] = pm
        cells[variant] = row
    tasks = sorted({t for row in cells.values() for t in row})
    return tasks, cells


def flat_metrics(results: dict[str, dict]) -> dict:
    """{variant: {task: {metric: value}}}: every numeric metric, for `dvc metrics` / experiments."""
    out = {}
    for variant, res in results.items():
        out[variant] = {task: {k.split(",")[0]: v for k, v in tr.items()
                               if isinstance(v, (int, float)) and "stderr" not in k and k != "sample_len"}
                        for task, tr in (res.get("results") or {}).items()}
    return out


def load_results(results_dir: Path) -> dict[str, dict]:
    results_dir = Path(results_dir)
    files = sorted(results_dir.glob("*.json"))
    if not files:
        raise PipelineError(f"{results_dir}: no results/*.json; run `omp evaluate` first")
    return {f.stem: read_json(f) for f in files}


def _delta(variant: str, task: str, cells: dict, baseline: str) -> float | None:
    if variant == baseline or task not in cells.get(baseline, {}) or task not in cells[variant]:
        return None
    return cells[variant][task][1] - cells[baseline][task][1]


def _cell(variant: str, task: str, cells: dict, baseline: str) -> tuple[str, float, float | None] | None:
    """(metric, value, delta against the baseline) of one leaderboard cell; None when not measured."""
    if task not in cells[variant]:
        return None
    metric, value = cells[variant][task]
    return metric, value, _delta(variant, task, cells, baseline)


def _metric_of(task: str, cells: dict) -> str:
    return next(cells[v][task][0] for v in cells if task in cells[v])


def _fmt(metric: str, value: float) -> str:
    return f"{value:.4f}" if metric in LOWER_IS_BETTER else f"{value:.3f}"


def _arrow(metric: str, delta: float) -> str:
    better = (delta < 0) if metric in LOWER_IS_BETTER else (delta > 0)
    return "" if delta == 0 else ("▲" if better else "▼")


def markdown(results: dict, arena: dict | None = None, contamination: dict | None = None,
             baseline: str = BASELINE) -> str:
    tasks, cells = table(results)
    lines = [f"| variant | {' | '.join(f'{t} ({_metric_of(t, cells)})' for t in tasks)} |",
             "|---" * (len(tasks) + 1) + "|"]
    for v in results:
        parts = []
        for t in tasks:
            c = _cell(v, t, cells, baseline)
            if c is None:
                parts.append("–")
                continue
            m, val, d = c
            parts.append(_fmt(m, val) + (f" ({f'{d:+.3f} {_arrow(m, d)}'.strip()})" if d is not None else ""))
        lines.append(f"| {v} | {' | '.join(parts)} |")
    out = ["## Leaderboard", "", f"Deltas against `{baseline}`; bits_per_byte: lower is better.", "", *lines]
    if arena and arena.get("variants"):
        out += ["", "## Arena (Bradley–Terry, item-by-item, bootstrap 95% CI)", "",
                "| rank | variant | rating | 95% CI | battles |", "|---|---|---|---|---|"]
        for k, r in enumerate(arena["variants"], 1):
            out.append(f"| {k} | {r['name']} | {r['rating']:.0f} | {r['lo']:.0f} – {r['hi']:.0f} | {r['battles']} |")
    if contamination and contamination.get("tasks"):
        out += ["", f"## Contamination ({contamination['ngram']}-gram overlap with the "
                    f"{contamination['training_tokens']:,} training tokens seen)", "",
                "| task | items | overlapping |", "|---|---|---|"]
        for t, c in sorted(contamination["tasks"].items()):
            out.append(f"| {t} | {c['items']} | {c['overlapping']} |")
    return "\n".join(out) + "\n"


_SORT_JS = r"""
document.querySelectorAll('table.sortable th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0];
  const asc = th.dataset.dir !== 'asc';
  th.closest('tr').querySelectorAll('th').forEach(h => delete h.dataset.dir);
  th.dataset.dir = asc ? 'asc' : 'desc';
  const key = r => { const c = r.cells[col]; const v = c.dataset.v; return v === undefined ? c.textContent : parseFloat(v); };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
    const r = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
    return asc ? r : -r; }).forEach(r => body.appendChild(r));
}));
// `leaderboard.html#sort=tasks:2:desc` sorts on load (used by the headless-browser check)
const m = location.hash.match(/^#sort=(\w+):(\d+)(?::(asc|desc))?$/);
if (m) { const th = document.querySelectorAll('#' + m[1] + ' th')[+m[2]];
  if (th) { if (m[3] === 'desc') th.dataset.dir = 'asc'; th.click(); } }
"""

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.35em .7em;text-align:right}
th{background:#f0f0f0;cursor:pointer;user-select:none}th[data-dir=asc]::after{content:' ↑'}
th[data-dir=desc]::after{content:' ↓'}td:first-child,th:first-child{text-align:left;white-space:nowrap}
.up{color:#0a7d2c}.down{color:#b3261e}.d{font-size:.85em;margin-left:.4em}
.row{display:flex;gap:3em;flex-wrap:wrap;align-items:flex-start}img{max-width:100%}"""


def render_html(results: dict, arena: dict | None = None, contamination: dict | None = None,
                baseline: str = BASELINE, chart: str | None = "leaderboard.png") -> str:
    tasks, cells = table(results)
    e = html.escape
    head = "".join(f"<th>{e(t)}<br><small>{e(_metric_of(t, cells))}</small></th>" for t in tasks)
    rows = []
    for v in results:
        tds = [f"<td>{e(v)}</td>"]
        for t in tasks:
            c = _cell(v, t, cells, baseline)
            if c is None:
                tds.append('<td data-v="NaN">–</td>')
                continue
            m, val, d = c
            delta = ""
            if d is not None:
                cls = "up" if _arrow(m, d) == "▲" else "down" if _arrow(m, d) == "▼" else ""
                delta = f'<span class="d {cls}">{d:+.3f}</span>'
            tds.append(f'<td data-v="{val!r}">{_fmt(m, val)}{delta}</td>')
        rows.append("<tr>" + "".join(tds) + "</tr>")
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Leaderboard</title>",
             f"<style>{_CSS}</style></head><body><h1>Leaderboard</h1>",
             f"<p>Deltas against <b>{e(baseline)}</b> (green: better). Click a column to sort. "
             "bits_per_byte: lower is better.</p><div class='row'><div>",
             f"<table class='sortable' id='tasks'><thead><tr><th>variant</th>{head}</tr></thead>"
             f"<tbody>{''.join(rows)}</tbody></table></div>"]
    if arena and arena.get("variants"):
        arows = "".join(f"<tr><td>{e(r['name'])}</td><td data-v='{r['rating']}'>{r['rating']:.0f}</td>"
                        f"<td data-v='{r['lo']}'>{r['lo']:.0f} – {r['hi']:.0f}</td>"
                        f"<td data-v='{r['battles']}'>{r['battles']}</td></tr>" for r in arena["variants"])
        parts.append("<div><h2>Arena</h2><p>Bradley–Terry from item-by-item pairs, bootstrap 95% CI</p>"
                     "<table class='sortable' id='arena'><thead><tr><th>variant</th><th>rating</th>"
                     f"<th>95% CI</th><th>battles</th></tr></thead><tbody>{arows}</tbody></table></div>")
    parts.append("</div>")
    if contamination and contamination.get("tasks"):
        crows = "".join(f"<tr><td>{e(t)}</td><td data-v='{c['items']}'>{c['items']}</td>"
                        f"<td data-v='{c['overlapping']}'>{c['overlapping']}</td></tr>"
                        for t, c in sorted(contamination["tasks"].items()))
        parts.append(f"<h2>Contamination</h2><p>{contamination['ngram']}-gram overlap with the "
                     f"{contamination['training_tokens']:,} training tokens the run saw</p>"
                     "<table class='sortable' id='contamination'><thead><tr><th>task</th><th>items</th>"
                     f"<th>overlapping</th></tr></thead><tbody>{crows}</tbody></table>")
    if chart:
        parts.append(f"<h2>Chart</h2><img src='{e(chart)}' alt='leaderboard chart'>")
    parts.append(f"<script>{_SORT_JS}</script></body></html>")
    return "\n".join(parts) + "\n"


def plot(results: dict, path: Path) -> None:
    """One bar panel per task (variants side by side), written atomically as PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, cells = table(results)
    variants = list(results)
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(3.2 * max(len(tasks), 1), 3.4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        vals = [cells[v][t][1] if t in cells[v] else 0.0 for v in variants]
        ax.bar(range(len(variants)), vals, color=[f"C{k}" for k in range(len(variants))])
        ax.set_xticks(range(len(variants)), variants, rotation=45, ha="right", fontsize=7)
        metric = next(cells[v][t][0] for v in variants if t in cells[v])
        ax.set_title(f"{t}\n{metric}{' (lower better)' if metric in LOWER_IS_BETTER else ''}", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write(out_dir: Path, results: dict, arena: dict | None, contamination: dict | None,
          baseline: str = BASELINE) -> None:
    atomic_write_text(out_dir / "leaderboard.md", markdown(results, arena, contamination, baseline))
    plot(results, out_dir / "leaderboard.png")
    atomic_write_text(out_dir / "leaderboard.html", render_html(results, arena, contamination, baseline))


# --------------------------------------------------------------------------- across experiments


def gather_dirs(dirs: list[tuple[str, Path]]) -> dict[str, dict]:
    """Results of several evaluate outputs, variants named `<label>/<variant>`."""
    out = {}
    for label, d in dirs:
        for variant, res in load_results(Path(d) / "results").items():
            out[f"{label}/{variant}"] = res
    return out


def dvc_experiments(cwd: Path = Path(".")) -> list[str]:
    proc = subprocess.run(["dvc", "exp", "list", "--name-only"], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PipelineError(f"dvc exp list failed: {proc.stderr.strip()[:300]}")
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def gather_experiments(cwd: Path = Path("."), path: str = "artifacts/evaluate/metrics.json") -> dict[str, dict]:
    """The baseline commit's and each DVC experiment's evaluate metrics, as results-like dicts.

    Variants are named `<experiment>/<variant>`; the commit the experiments start from is `HEAD`.
    """
    import dvc.api

    out = {}
    for rev in ["HEAD", *dvc_experiments(cwd)]:
        try:
            metrics = json.loads(dvc.api.read(path, repo=str(cwd), rev=rev))
        except Exception as e:  # noqa: BLE001 - an experiment without an evaluate output is skipped
            status(f"leaderboard: {rev}: no {path} ({type(e).__name__})")
            continue
        for variant, tasks in metrics.items():
            out[f"{rev}/{variant}"] = {
                "results": {t: {f"{k},none": v for k, v in m.items()} for t, m in tasks.items()}}
    return out
