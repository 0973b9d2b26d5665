"""``report.html``: the leaderboard of :mod:`harness.store.report` as one self-contained page.

Tables, warnings and three kinds of plots (matplotlib, inlined as SVG so the page needs
no network and no other file): the gain of each method with its 95% interval, the
metric against device-hours, and the validation curves of every cell (mean over seeds).
"""
from __future__ import annotations

import html
import io
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from . import report
from .searches import searches


def _svg(fig: "object") -> str:
    import matplotlib
    import matplotlib.pyplot as plt
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):      # text stays text: searchable, selectable
        fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]                  # drop the XML prolog: it is inlined


def _blocks(board: pd.DataFrame) -> list[tuple[tuple[str, str, str, str], pd.DataFrame]]:
    return [] if board.empty else list(board.groupby(["task", "dataset", "teacher", "student"], sort=False))


def gain_plot(board: pd.DataFrame) -> str:
    """Gain over the student alone per method, with its 95% interval, one panel per cell."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    blocks = [(k, p[~p["method"].isin(["teacher", "none"])]) for k, p in _blocks(board)]
    blocks = [(k, p) for k, p in blocks if len(p)]
    if not blocks:
        return ""
    fig, axes = plt.subplots(len(blocks), 1, figsize=(7, 1.2 + 0.45 * max(len(p) for _, p in blocks) * len(blocks)),
                             squeeze=False)
    for ax, ((task, dataset, teacher, student), part) in zip(axes[:, 0], blocks):
        y = range(len(part))
        err = [[g - lo if not math.isnan(lo) else 0 for g, lo in zip(part["gain"], part["gain_lo"])],
               [hi - g if not math.isnan(hi) else 0 for g, hi in zip(part["gain"], part["gain_hi"])]]
        colors = ["tab:green" if d == "yes" else "tab:gray" for d in part["distinguishable"]]
        ax.barh(list(y), part["gain"], xerr=err, color=colors, capsize=3)
        ax.set_yticks(list(y), part["method"])
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(f"{dataset}: {teacher} -> {student}", fontsize=9)
        ax.set_xlabel(f"gain over the student alone ({part['metric'].iloc[0]}), 95% CI")
    fig.tight_layout()
    return _svg(fig)


def cost_plot(board: pd.DataFrame, matched: pd.DataFrame | None = None) -> str:
    """Each method's mean metric against its device-hours per trial; with ``matched``
    (``equal_compute.points``), each compute-matched baseline too, hollow, labelled with
    the method whose compute it was given, beside the student alone on the schedule."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    blocks = [(k, p.dropna(subset=["device_hours", "mean"])) for k, p in _blocks(board)]
    blocks = [(k, p) for k, p in blocks if len(p)]
    if not blocks:
        return ""
    fig, axes = plt.subplots(1, len(blocks), figsize=(4.2 * len(blocks), 3.4), squeeze=False)
    for ax, ((task, dataset, teacher, student), part) in zip(axes[0], blocks):
        ax.scatter(part["device_hours"], part["mean"])
        for r in part.itertuples():
            ax.annotate(r.method, (r.device_hours, r.mean), fontsize=8, xytext=(3, 3), textcoords="offset points")
        if matched is not None and not matched.empty and teacher:
            mine = matched[(matched["dataset"] == dataset) & (matched["student"] == student)
                           & matched["to"].str.startswith(f"{teacher}/")]
            ax.scatter(mine["hours"], mine["v"], facecolors="none", edgecolors="tab:orange")
            for r in mine.itertuples():
                ax.annotate(f"none at {r.to.split('/', 1)[1]}'s compute", (r.hours, r.v), fontsize=8,
                            xytext=(3, -9), textcoords="offset points", color="tab:orange")
        ax.set_xlabel("device-hours per trial")
        ax.set_ylabel(part["metric"].iloc[0])
        ax.set_title(f"{dataset}: {teacher or '-'} -> {student or '-'}", fontsize=9)
    fig.tight_layout()
    return _svg(fig)


def curves_plot(df: pd.DataFrame, board: pd.DataFrame) -> str:
    """Validation curves (primary metric, mean over seeds) of every method of every cell."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if "curve" not in df:
        return ""
    ok = df[(df["status"] == "ok") & df["primary"] & df["curve"].notna()]
    blocks = _blocks(board)
    if ok.empty or not blocks:
        return ""
    fig, axes = plt.subplots(1, len(blocks), figsize=(4.2 * len(blocks), 3.4), squeeze=False)
    drawn = False
    for ax, ((task, dataset, teacher, student), part) in zip(axes[0], blocks):
        for method in part["method"]:
            sel = ok[(ok["dataset"] == dataset) & (ok["method"] == method)]
            sel = sel[(sel["teacher"] == teacher) & (sel["role"] == "teacher")] if method == "teacher" else \
                sel[(sel["student"] == student) & ((sel["teacher"] == teacher) | (sel["method"] == "none"))]
            points = [(e, v) for c in sel["curve"] for e, v in json.loads(c or "[]")]
            if not points:
                continue
            mean = pd.DataFrame(points, columns=["epoch", "value"]).groupby("epoch")["value"].mean()
            ax.plot(mean.index, mean.values * report.display_scale(part["metric"].iloc[0]), marker="o", markersize=3,
                    label={"none": "student alone"}.get(method, method))
            drawn = True
        ax.set_xlabel("epoch")
        ax.set_ylabel(part["metric"].iloc[0])
        ax.set_title(f"{dataset}: {teacher or '-'} -> {student or '-'}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _svg(fig) if drawn else ""


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.yes td { background: #eaf6ea; }
.warn { color: #8a4b00; }
figure { margin: 1em 0; }
"""


def _items(lines: list[str], cls: str = "") -> str:
    """Lines as an HTML list, escaped."""
    attr = f" class='{cls}'" if cls else ""
    return "<ul>" + "".join(f"<li{attr}>{html.escape(line)}</li>" for line in lines) + "</ul>"


def _section(title: str, lines: list[str], cls: str = "") -> str:
    """A titled list; nothing when there are no lines."""
    return f"<h2>{html.escape(title)}</h2>{_items(lines, cls)}" if lines else ""


def to_html(df: pd.DataFrame, best: bool = False, datasets: dict[str, Any] | None = None,
            interval: str = "t", trim: bool = False, trials: list[dict[str, Any]] | None = None,
            seed_rule: dict[str, Any] | None = None, tolerance: float = 0.1,
            tuned: dict[str, str] | None = None) -> str:
    """The whole report page (one string, no external resource)."""
    board = report.leaderboard(df, best, interval, trim)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>kd-harness report</title>"
             f"<style>{CSS}</style></head><body><h1>Leaderboard</h1>",
             "<ul class='about'>" + "".join(f"<li>{html.escape(line)}</li>" for line in report.about(df)) + "</ul>"]
    if datasets:
        parts.append("<p class='datasets'>Datasets: "
                     + "; ".join(html.escape(line) for line in report.dataset_lines(datasets)) + "</p>")
    if board.empty:
        parts.append("<p>no successful trials yet</p>")
    for (task, dataset, teacher, student), part in _blocks(board):
        parts.append(f"<h2>{html.escape(report.title(task, dataset, part['metric'].iloc[0], teacher, student, best))}"
                     f"</h2><table class='leaderboard'><thead><tr>"
                     + "".join(f"<th>{html.escape(h)}</th>" for h in report.HEADER) + "</tr></thead><tbody>")
        for cells in report.table_rows(part):
            parts.append(f"<tr class='{html.escape(cells[7])}'>"
                         + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        parts.append("</tbody></table>")
    if not board.empty:
        parts.append(f"<p class='note'>{html.escape(report.estimate_line(interval, trim))}</p>")
    parts.append(_section("Seeds until precise", report.seed_lines(board, seed_rule)))
    parts.append(_section("Tuned configurations", report.tuned_lines(board, tuned)))
    from . import equal_compute as ec
    table = ec.equal_compute(df, board, best, interval, trim, tolerance)
    if not table.empty:
        parts.append("<h2>Gain at equal schedule and at equal compute</h2><table class='leaderboard'><thead><tr>"
                     + "".join(f"<th>{html.escape(h)}</th>" for h in ec.HEADER) + "</tr></thead><tbody>"
                     + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
                               for cells in ec.table_rows(table))
                     + "</tbody></table>" + _items(ec.notes(table)))
    from .papers import paper_lines
    parts.append(_section("The papers' numbers", paper_lines(board, trials)))
    parts.append(_section("Warnings", report.warnings_for(df, board), "warn"))
    for name, svg in (("Gain over the student alone (95% CI)", gain_plot(board)),
                      ("Metric against device-hours", cost_plot(board, ec.points(df, best))),
                      ("Validation curves", curves_plot(df, board))):
        if svg:
            parts.append(f"<h2>{name}</h2><figure class='plot'>{svg}</figure>")
    for sr in searches(df):
        best_text = f"{sr['best']['params']} ({sr['best']['score']:.2f})" if sr["best"] else "none finished"
        parts.append(f"<h2>Search {html.escape(sr['search_id'])} ({html.escape(sr['cell'])})</h2>"
                     f"<p>Best: <code>{html.escape(best_text)}</code></p><table class='search'><thead><tr>"
                     "<th>params</th><th>status</th><th>seeds</th><th>score</th></tr></thead><tbody>"
                     + "".join(f"<tr><td><code>{html.escape(t['params'])}</code></td><td>{html.escape(t['status'])}</td>"
                               f"<td>{t['seeds']}</td><td>{report._f(t['score'], '.2f')}</td></tr>" for t in sr["trials"])
                     + "</tbody></table>")
    fails = report.failures(df)
    parts.append(_section(f"{len(fails)} trial(s) without a result", fails))
    sentence = report.in_one_sentence(board)
    if sentence:
        parts.append(f"<p class='summary'><b>{html.escape(sentence)}</b></p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(df: pd.DataFrame, directory: str | Path, best: bool = False, interval: str = "t",
                 trim: bool = False, record: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``leaderboard.md`` and ``report.html`` into ``directory``; return both paths.
    ``record``: the suite as last run there (``results.suite_record``: its datasets, trials
    and seed rule; read from the directory when not given)."""
    from .results import suite_record, write_text_atomic
    directory = Path(directory)
    record = suite_record(directory) if record is None else record
    extra = (record["datasets"], interval, trim, record["trials"], record["seed_rule"], record.get("tolerance", 0.1),
             record.get("tuned"))
    md = write_text_atomic(directory / "leaderboard.md", report.to_markdown(df, best, *extra))
    page = write_text_atomic(directory / "report.html", to_html(df, best, *extra))
    return md, page
