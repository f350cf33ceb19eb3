"""The leaderboard: variants × tasks from lm-eval results files, with deltas against the baseline.

Written by the evaluate stage (leaderboard.md / .html / .png) and by `omp leaderboard`, which can
also gather the results of several DVC experiments (or result directories) into one table.
"""

from __future__ import annotations

import html
import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_bytes, atomic_write_text, read_json
from pipeline.core.log import status
from pipeline.core.paths import OUT

BASELINE = "pretrain"
Z = 1.96  # a delta is marked better/worse only beyond this many standard errors of the difference


@dataclass(frozen=True)
class Cell:
    """One leaderboard cell: the task's primary metric, its standard error and items scored."""
    metric: str
    value: float
    stderr: float | None = None
    n: int | None = None
# The one number shown per task, in order of preference; lower is better only for bits_per_byte.
PRIMARY = ("bits_per_byte", "acc", "exact_match")
LOWER_IS_BETTER = {"bits_per_byte", "byte_perplexity", "word_perplexity"}


def primary_metric(task_result: dict) -> tuple[str, float] | None:
    for m in PRIMARY:
        v = task_result.get(f"{m},none")
        if isinstance(v, (int, float)):
            return m, float(v)
    return None


def _number(v) -> float | None:
    """lm-eval writes "N/A" where it computed no stderr."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else None


def _n_items(res: dict, task: str, tr: dict) -> int | None:
    """Items scored: lm-eval's `n-samples.<task>.effective`, or `n` of flat metrics (experiments)."""
    ns = (res.get("n-samples") or {}).get(task) or {}
    n = ns.get("effective") if isinstance(ns, dict) else None
    n = n if n is not None else tr.get("n,none")
    return int(n) if isinstance(n, (int, float)) else None


def table(results: dict[str, dict]) -> tuple[list[str], dict[str, dict[str, Cell]]]:
    """(tasks, {variant: {task: Cell}}) over every task any variant has."""
    cells = {}
    for variant, res in results.items():
        row = {}
        for task, tr in (res.get("results") or {}).items():
            pm = primary_metric(tr)
            if pm:
                row[task] = Cell(pm[0], pm[1], _number(tr.get(f"{pm[0]}_stderr,none")), _n_items(res, task, tr))
        cells[variant] = row
    tasks = sorted({t for row in cells.values() for t in row})
    return tasks, cells


def flat_metrics(results: dict[str, dict]) -> dict:
    """{variant: {task: {metric: value, metric_stderr: se, n: items}}}: numbers only, for `dvc metrics`
    and `omp leaderboard --experiments` (which reads stderr and n back from here)."""
    out = {}
    for variant, res in results.items():
        out[variant] = {}
        for task, tr in (res.get("results") or {}).items():
            row = {k.split(",")[0]: v for k, v in tr.items()
                   if _number(v) is not None and k.split(",")[0] != "sample_len"}
            n = _n_items(res, task, tr)
            if n is not None:
                row["n"] = n
            out[variant][task] = row
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
    return cells[variant][task].value - cells[baseline][task].value


def significant(variant: str, task: str, cells: dict, baseline: str) -> bool:
    """A difference counts only beyond noise: |Δ| > Z · sqrt(se_variant² + se_baseline²) (both
    stderrs known). Unpaired, so conservative for two variants scored on the same items."""
    d = _delta(variant, task, cells, baseline)
    a, b = cells[variant].get(task), cells.get(baseline, {}).get(task)
    if d is None or a.stderr is None or b.stderr is None:
        return False
    return abs(d) > Z * math.hypot(a.stderr, b.stderr)


def _cell(variant: str, task: str, cells: dict, baseline: str) -> tuple[Cell, float | None, bool] | None:
    """(cell, delta against the baseline, significant?) of one leaderboard cell; None when not measured."""
    if task not in cells[variant]:
        return None
    return cells[variant][task], _delta(variant, task, cells, baseline), significant(variant, task, cells, baseline)


def _metric_of(task: str, cells: dict) -> str:
    return next(cells[v][task].metric for v in cells if task in cells[v])


def _n_of(task: str, cells: dict) -> str:
    ns = sorted({cells[v][task].n for v in cells if task in cells[v] and cells[v][task].n is not None})
    return "?" if not ns else "/".join(map(str, ns))


def _fmt(metric: str, value: float) -> str:
    return f"{value:.4f}" if metric in LOWER_IS_BETTER else f"{value:.3f}"


def _arrow(metric: str, delta: float) -> str:
    better = (delta < 0) if metric in LOWER_IS_BETTER else (delta > 0)
    return "" if delta == 0 else ("▲" if better else "▼")


def _cell_text(c: Cell, d: float | None, sig: bool) -> str:
    s = _fmt(c.metric, c.value) + (f" ± {_fmt(c.metric, c.stderr)}" if c.stderr is not None else "")
    if d is not None:
        s += f" ({d:+.3f}{' ' + _arrow(c.metric, d) if sig and _arrow(c.metric, d) else ''})"
    return s


NOTE = (f"Each cell: value ± stderr (n = items scored). Deltas against `{{baseline}}`; ▲/▼ only where "
        f"|Δ| > {Z} × sqrt(se² + se_baseline²), i.e. beyond the noise of the items; bits_per_byte: lower is better.")


def markdown(results: dict, arena: dict | None = None, contamination: dict | None = None,
             baseline: str = BASELINE) -> str:
    tasks, cells = table(results)
    lines = [f"| variant | {' | '.join(f'{t} ({_metric_of(t, cells)}, n={_n_of(t, cells)})' for t in tasks)} |",
             "|---" * (len(tasks) + 1) + "|"]
    for v in results:
        parts = []
        for t in tasks:
            c = _cell(v, t, cells, baseline)
            parts.append("–" if c is None else _cell_text(*c))
        lines.append(f"| {v} | {' | '.join(parts)} |")
    out = ["## Leaderboard", "", NOTE.format(baseline=baseline), "", *lines]
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
    head = "".join(f"<th>{e(t)}<br><small>{e(_metric_of(t, cells))}, n={e(_n_of(t, cells))}</small></th>"
                   for t in tasks)
    rows = []
    for v in results:
        tds = [f"<td>{e(v)}</td>"]
        for t in tasks:
            c = _cell(v, t, cells, baseline)
            if c is None:
                tds.append('<td data-v="NaN">–</td>')
                continue
            cell, d, sig = c
            m, val = cell.metric, cell.value
            se = f'<small> ± {_fmt(m, cell.stderr)}</small>' if cell.stderr is not None else ""
            delta = ""
            if d is not None:
                arrow = _arrow(m, d) if sig else ""
                cls = "up" if arrow == "▲" else "down" if arrow == "▼" else ""
                delta = f'<span class="d {cls}">{d:+.3f}{" " + arrow if arrow else ""}</span>'
            tds.append(f'<td data-v="{val!r}">{_fmt(m, val)}{se}{delta}</td>')
        rows.append("<tr>" + "".join(tds) + "</tr>")
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Leaderboard</title>",
             f"<style>{_CSS}</style></head><body><h1>Leaderboard</h1>",
             f"<p>{e(NOTE.format(baseline=baseline)).replace('`', '')} Green: better beyond noise. "
             "Click a column to sort.</p><div class='row'><div>",
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


def plot(results: dict, path: Path) -> list[str]:
    """One bar panel per task (variants side by side, stderr as error bars), written atomically as
    PNG; returns the tasks drawn. Panels where every variant scored exactly 0 are left out (named in
    the figure's footnote) and unmeasured variants get no bar, so no panel is an empty row of zeros."""
    import io

    import matplotlib   # heavy; `omp leaderboard` and the release import this module without drawing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, cells = table(results)
    variants = list(results)
    zero = [t for t in tasks if all(cells[v][t].value == 0 for v in variants if t in cells[v])]
    drawn = [t for t in tasks if t not in zero]
    cols = min(3, max(len(drawn), 1))
    rows = max(1, math.ceil(len(drawn) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.4 * rows), squeeze=False)
    for ax in axes.flat[len(drawn):]:
        ax.axis("off")
    for ax, t in zip(axes.flat, drawn):
        xs = [k for k, v in enumerate(variants) if t in cells[v]]
        vals = [cells[variants[k]][t].value for k in xs]
        errs = [cells[variants[k]][t].stderr or 0.0 for k in xs]
        ax.bar(xs, vals, yerr=errs, capsize=4, color=[f"C{k}" for k in xs])
        for x, val in zip(xs, vals):
            ax.annotate(_fmt(cells[variants[x]][t].metric, val), (x, val), ha="center", va="bottom",
                        fontsize=10, xytext=(0, 3), textcoords="offset points")
        ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right", fontsize=11)
        metric = _metric_of(t, cells)
        ax.set_title(f"{t}\n{metric}{' (lower is better)' if metric in LOWER_IS_BETTER else ''}, n={_n_of(t, cells)}",
                     fontsize=13)
        ax.tick_params(axis="y", labelsize=10)
        ax.margins(y=0.15)
    if zero:
        fig.text(0.01, 0.005, f"0 for every variant (not drawn): {', '.join(zero)}", fontsize=11)
    if not drawn:
        axes[0][0].text(0.5, 0.5, "no task with a nonzero score", ha="center", va="center", fontsize=13)
    fig.tight_layout(rect=(0, 0.04 if zero else 0, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return drawn


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


def gather_experiments(cwd: Path = Path("."), path: str = (OUT["evaluate"] / "metrics.json").as_posix()) -> dict[str, dict]:
    """The workspace's, the baseline commit's and each DVC experiment's evaluate metrics, as
    results-like dicts named `<rev>/<variant>`: `workspace` is what `make repro` / `dvc repro` just
    wrote (read from disk), `HEAD` what the commit's dvc.lock points to, then every `dvc exp`.
    Revisions without the file are skipped with a note on stderr.
    """
    import dvc.api   # heavy; only `omp leaderboard --experiments` reads DVC experiments

    def as_results(metrics: dict, rev: str) -> None:
        for variant, tasks in metrics.items():
            out[f"{rev}/{variant}"] = {
                "results": {t: {f"{k},none": v for k, v in m.items()} for t, m in tasks.items()}}

    out: dict[str, dict] = {}
    local = Path(cwd) / path
    if local.is_file():
        as_results(read_json(local), "workspace")
    else:
        status(f"leaderboard: workspace: no {path} (run `make repro` or `dvc repro evaluate`)")
    for rev in ["HEAD", *dvc_experiments(cwd)]:
        try:
            metrics = json.loads(dvc.api.read(path, repo=str(cwd), rev=rev))
        except Exception as e:  # noqa: BLE001 - an experiment without an evaluate output is skipped
            status(f"leaderboard: {rev}: no {path} ({type(e).__name__})")
            continue
        as_results(metrics, rev)
    return out
