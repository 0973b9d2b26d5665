"""Leaderboards from a results store, as a pure function of its rows.

Per task, dataset and (teacher, student) pair, one row per method: mean over seeds with
a 95% confidence interval (Student's t), the gain over the student alone with a paired
t-test over the seeds both ran (scipy) and whether it is distinguishable from seed
noise, the share of the teacher-student gap closed, and cost (device-hours, images per
second, the teacher's share of the step time). Warnings flag what makes a cell
meaningless: a teacher no better than the student, a distilled trial on another
schedule or dataset than its baseline, a teacher that is not the checkpoint it names.

The same table comes out of pandas here and of DuckDB in the README; the Markdown and
the HTML (:mod:`harness.store.html_report`) are two renderings of it.
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from harness import catalog
from harness.registry import preview

from .searches import searches  # noqa: F401
from .stats import (ALPHA, MIN_SEEDS, board_rows, display_scale, distilled_cells, mean_interval,  # noqa: F401
                    olympic, paired_gain, paired_p_value, stop_reason, suite_rows, value_column, verdict)


def leaderboard(df: pd.DataFrame, best: bool = False, interval: str = "t", trim: bool = False) -> pd.DataFrame:
    """One row per (task, dataset, teacher, student, method) on the primary metric.
    ``interval``: Student's t or a bootstrap; ``trim``: olympic scoring (:mod:`.stats`)."""
    ok = board_rows(df)
    ok = ok[(ok["status"] == "ok") & (ok["primary"])].copy()
    ok["v"] = value_column(ok, best)
    for col in ("device_hours", "teacher_time_share", "train_images_per_s"):
        if col not in ok:
            ok[col] = math.nan
    rows: list[dict[str, Any]] = []
    for (task, dataset), part in ok.groupby(["task", "dataset"], sort=True):
        metric = part["metric"].iloc[0]
        scale = display_scale(metric)
        higher = bool(part["higher_is_better"].iloc[0])
        sign = 1.0 if higher else -1.0
        teachers = part[part["role"] == "teacher"].groupby("teacher")["v"].mean() * scale
        alone_rows = part[part["method"] == "none"]
        alone_seeds = alone_rows.groupby(["student", "seed"])["v"].mean() * scale
        students = part[part["role"] == "student"]
        pairs = list(students[students["teacher"] != ""][["teacher", "student"]]
                     .drop_duplicates().itertuples(index=False, name=None))
        paired = {s for _, s in pairs} | {t for t, _ in pairs}
        pairs += [("", s) for s in alone_rows["student"].unique() if s not in paired]   # only the student ran
        pairs += [(t, "") for t in teachers.index if t not in paired]                   # only the teacher ran
        for teacher, student in pairs:
            t_score = teachers.get(teacher, math.nan)
            base_seeds = (alone_seeds[student] if student in alone_seeds.index.get_level_values(0)
                          else pd.Series(dtype=float))
            base = (olympic(base_seeds) if trim else base_seeds).mean() if len(base_seeds) else math.nan
            gap = sign * (t_score - base)
            common = dict(task=task, dataset=dataset, teacher=teacher, student=student, metric=metric,
                          best=best)
            if teacher:
                t_rows = part[(part["role"] == "teacher") & (part["teacher"] == teacher)]
                rows.append(dict(common, method="teacher", mean=t_score, ci_lo=math.nan, ci_hi=math.nan,
                                 std=math.nan, n=int(teacher in teachers.index), gain=math.nan, gain_lo=math.nan,
                                 gain_hi=math.nan, p_value=math.nan, distinguishable="", gap_closed=math.nan,
                                 device_hours=t_rows.groupby("trial_id")["device_hours"].first().sum(min_count=1),
                                 images_per_s=t_rows["train_images_per_s"].mean(), teacher_share=math.nan))
            sel = students[(students["student"] == student)
                           & ((students["teacher"] == teacher) | (students["method"] == "none"))]
            for method, m in sel.groupby("method", sort=False):
                values = m.groupby("seed")["v"].mean() * scale
                kept = olympic(values) if trim else values
                mean = float(kept.mean())
                lo, hi = mean_interval(kept, interval)
                distilled = method != "none"
                gain, g_lo, g_hi, n_pairs = paired_gain(values, base_seeds, higher, interval, trim) \
                    if distilled else (0.0, math.nan, math.nan, 0)
                p = paired_p_value(values, base_seeds, trim) if distilled else math.nan
                per_trial = m.groupby("trial_id")
                rows.append(dict(
                    common, method=method, mean=mean, ci_lo=lo, ci_hi=hi,
                    std=float(values.std(ddof=1)) if len(values) > 1 else math.nan, n=len(values),
                    gain=gain if distilled else 0.0, gain_lo=g_lo, gain_hi=g_hi, p_value=p,
                    distinguishable=verdict(p, n_pairs) if distilled else "",
                    gap_closed=gain / gap if distilled and gap > 0 else math.nan,
                    device_hours=per_trial["device_hours"].first().mean(),
                    images_per_s=per_trial["train_images_per_s"].first().mean(),
                    teacher_share=per_trial["teacher_time_share"].first().mean() if distilled else math.nan))
    board = pd.DataFrame(rows)
    if board.empty:
        return board
    order = {"teacher": 0, "none": 1}
    board["_o"] = board["method"].map(lambda m: order.get(m, 2))
    return board.sort_values(["task", "dataset", "teacher", "student", "_o", "method"]).drop(columns="_o")


def warnings_for(df: pd.DataFrame, board: pd.DataFrame | None = None) -> list[str]:
    """What makes a cell meaningless or two cells incomparable, one sentence each."""
    board = leaderboard(df) if board is None else board
    out: list[str] = []
    if not board.empty:
        for (dataset, teacher, student), part in board.groupby(["dataset", "teacher", "student"], sort=False):
            t = part[part["method"] == "teacher"]["mean"]
            s = part[part["method"] == "none"]["mean"]
            higher = bool(df[df["dataset"] == dataset]["higher_is_better"].iloc[0])
            if teacher and student and len(t) and len(s) and not ((t.iloc[0] > s.iloc[0]) == higher
                                                                  and t.iloc[0] != s.iloc[0]):
                out.append(f"{dataset}: teacher {teacher} ({t.iloc[0]:.2f}) is not better than student {student} "
                           f"alone ({s.iloc[0]:.2f}): its distillation cells cannot show knowledge transfer")
    ok = board_rows(df)
    ok = ok[(ok["status"] == "ok") & ok["primary"]]
    for col, what in (("schedule_hash", "schedule"), ("dataset_fingerprint", "dataset")):
        if col not in ok:
            continue
        base = ok[ok["method"] == "none"].groupby(["dataset", "student"])[col].agg(lambda v: set(v.dropna()))
        for r in ok[(ok["role"] == "student") & (ok["method"] != "none")].itertuples():
            ref = base.get((r.dataset, r.student), set())
            value = getattr(r, col)
            if ref and isinstance(value, str) and value and value not in ref:
                out.append(f"{r.trial_name}: its {what} differs from its baseline's (student {r.student} alone "
                           f"on {r.dataset}); the gain compares different {what}s")
    if "teacher_weights_hash" in ok:
        t_hash = ok[ok["role"] == "teacher"].groupby(["dataset", "teacher"])["teacher_weights_hash"].agg(
            lambda v: set(v.dropna()) - {""})
        for r in ok[(ok["role"] == "student") & (ok["teacher"] != "")].itertuples():
            ref = t_hash.get((r.dataset, r.teacher), set())
            if ref and r.teacher_weights_hash and r.teacher_weights_hash not in ref:
                out.append(f"{r.trial_name}: the teacher it ran with is not the teacher {r.teacher} of this store "
                           f"(weights hash {r.teacher_weights_hash[:12]} vs {', '.join(h[:12] for h in ref)})")
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------------------- Markdown
_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*[]|!~"} | {"&": "&amp;", "<": "&lt;", "\n": " ",
                                                                "\r": " "})


def md_text(value: Any) -> str:
    """A string from the store as Markdown text that stays text: HTML (``<``, ``&``) as
    entities, and the characters that make links, images, code, emphasis or table cells
    escaped, on one line (a viewer that renders inline HTML renders none of ours)."""
    return str(value).translate(_MD_SPECIAL)


def _md_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Every string of the store's rows as :func:`md_text` (the Markdown report's input):
    a value without Markdown or HTML in it is unchanged, so grouping and labels are too."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object or pd.api.types.is_string_dtype(out[col]):
            out[col] = out[col].map(lambda v: md_text(v) if isinstance(v, str) else v)
    return out


def _f(v: Any, fmt: str) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def title(task: str, dataset: str, metric: str, teacher: str, student: str, best: bool) -> str:
    scale = " x100" if display_scale(metric) != 1 else ""
    epoch = "best epoch" if best else "last epoch"
    return f"{dataset} ({task}, {metric}{scale}, {epoch}): teacher {teacher or '-'} -> student {student or '-'}"


HEADER = ["method", "mean", "95% CI", "n", "gain", "95% CI of gain", "p", "distinguishable", "gap closed",
          "device-h", "img/s", "teacher share"]


def table_rows(part: pd.DataFrame) -> list[list[str]]:
    """The cells of one block, as strings (shared by the Markdown and the HTML)."""
    out = []
    for r in part.itertuples():
        label = {"teacher": "teacher", "none": "student alone"}.get(r.method, r.method)
        ci = "" if math.isnan(r.ci_lo) else f"[{r.ci_lo:.2f}, {r.ci_hi:.2f}]"
        gci = "" if math.isnan(r.gain_lo) else f"[{r.gain_lo:+.2f}, {r.gain_hi:+.2f}]"
        out.append([label, _f(r.mean, ".2f"), ci, str(r.n), _f(r.gain, "+.2f") if r.method != "teacher" else "",
                    gci, _f(r.p_value, ".3f"), r.distinguishable, _f(r.gap_closed, ".0%"),
                    _f(r.device_hours, ".3f"), _f(r.images_per_s, ".1f"), _f(r.teacher_share, ".0%")])
    return out


def failures(df: pd.DataFrame) -> list[str]:
    """Suite trials without a result (a search's pruned trials are in its own section)."""
    df = suite_rows(df)
    errors = df[df["status"] != "ok"].drop_duplicates("trial_id")
    return [f"{r.trial_name} [{r.trial_id}] {r.status}: {r.error}" for r in errors.itertuples()]


def about(df: pd.DataFrame) -> list[str]:
    """What the report is of, one line each: the suite, when it ran, the harness and
    package versions, the machines and devices, the trials by status and the
    device-hours they took."""
    import json
    trials = df.drop_duplicates("trial_id")
    lines = [f"Suite: {', '.join(sorted(map(str, trials['suite'].dropna().unique()))) or '?'}"]
    starts, ends = trials["started_at"].dropna(), trials["ended_at"].dropna()
    if len(starts) and len(ends):
        lines.append(f"Ran: {str(starts.min())[:19].replace('T', ' ')} to {str(ends.max())[:19].replace('T', ' ')} UTC")
    code = sorted(map(str, trials["code_version"].dropna().unique()))
    lines.append(f"Harness: {', '.join(code) or '?'}" + (" (several versions: compare with care)" if len(code) > 1 else ""))
    versions: dict[str, set[str]] = {}
    for blob in trials["versions"].dropna().unique():
        try:
            for name, version in json.loads(blob).items():
                versions.setdefault(name, set()).add(str(version))
        except (ValueError, AttributeError):
            continue
    if versions:
        lines.append("Packages: " + ", ".join(f"{name} {' / '.join(sorted(v))}" for name, v in sorted(versions.items())))
    nodes = trials["node_ip"].replace("", None).dropna().unique() if "node_ip" in trials else []
    devices = trials[trials["status"] == "ok"]["device"].dropna().value_counts()
    lines.append(f"Machines: {len(nodes) or 1} node(s)" + (f" ({', '.join(map(str, sorted(nodes)))})" if len(nodes) else "")
                 + ("; devices: " + ", ".join(f"{d} x{n}" for d, n in devices.items()) if len(devices) else ""))
    counts = trials["status"].value_counts()
    lines.append(f"Trials: {len(trials)} (" + ", ".join(f"{n} {status}" for status, n in counts.items()) + ")"
                 f"; {trials['device_hours'].fillna(0).sum():.3f} device-hours in all")
    return lines


def dataset_lines(datasets: dict[str, dict[str, Any]] | None) -> list[str]:
    """One line per dataset: its format, class count and first class names."""
    out = []
    for name, ds in (datasets or {}).items():
        classes = ds.get("classes")
        what = f"{len(classes)} classes ({preview(classes)})" if classes else "classes unknown"
        out.append(f"{name} ({ds.get('format', '?')}, {ds.get('root', '?')}): {what}")
    return out


def estimate_line(interval: str = "t", trim: bool = False) -> str:
    """How the cells' means, intervals and tests were made, in words."""
    how = "bootstrap, 10,000 resamples, percentile" if interval == "bootstrap" else "Student's t"
    olympic_words = ("; olympic scoring (MLPerf): each cell's best and worst seed dropped, and for gains the best "
                     "and worst paired differences" if trim else "")
    return (f"Mean and its 95% confidence interval over seeds ({how}){olympic_words}; gain over the student alone "
            f"with its 95% interval and a paired t-test over the seeds both ran; distinguishable: p < {ALPHA} "
            f"with at least {MIN_SEEDS} seeds (n<{MIN_SEEDS}: too few seeds to tell); gap closed: "
            f"(method - student) / (teacher - student).")


def seed_lines(board: pd.DataFrame, rule: dict[str, Any] | None) -> list[str]:
    """Under a seed rule: each distilled cell's seed count and why it stopped there."""
    if not rule or board.empty:
        return []
    cells = distilled_cells(board)
    return [f"{r.method} on {r.dataset} ({r.teacher} -> {r.student}): {r.n} seeds; "
            f"{stop_reason(int(r.n), r.gain_lo, r.gain_hi, rule)}" for r in cells.itertuples()]


def tuned_lines(board: pd.DataFrame, tuned: dict[str, str] | None) -> list[str]:
    """Under a suite some of whose configurations a search chose (``tuned``: label ->
    search id): each distilled cell's comparison, tuned-vs-tuned or against an untuned
    baseline (or a tuned baseline against an untuned method)."""
    if not tuned or board.empty:
        return []
    alone = f"a tuned student alone (search {tuned['none']})" if "none" in tuned else "an untuned student alone"
    out = []
    for r in distilled_cells(board).itertuples():
        method = f"tuned (search {tuned[r.method]})" if r.method in tuned else "untuned"
        kind = ("tuned-vs-tuned" if r.method in tuned and "none" in tuned else
                "against an untuned baseline" if r.method in tuned else "an untuned method against a tuned baseline"
                if "none" in tuned else "untuned")
        out.append(f"{r.method} on {r.dataset} ({r.teacher} -> {r.student}): {kind}: the method {method}, "
                   f"against {alone}")
    return out


def to_markdown(df: pd.DataFrame, best: bool = False, datasets: dict[str, dict[str, Any]] | None = None,
                interval: str = "t", trim: bool = False, trials: list[dict[str, Any]] | None = None,
                seed_rule: dict[str, Any] | None = None, tolerance: float = 0.1,
                tuned: dict[str, str] | None = None) -> str:
    """The leaderboard as Markdown: the datasets, a table per dataset and pair, warnings,
    failures. Strings from the store are escaped (:func:`md_text`)."""
    rows, df = df, _md_safe(df)
    board = leaderboard(df, best, interval, trim)
    lines: list[str] = ["# Leaderboard", ""] + [f"- {line}" for line in about(df)] + [""]
    if datasets:
        lines += ["Datasets: " + "; ".join(map(md_text, dataset_lines(datasets))), ""]
    if board.empty:
        lines += ["no successful trials yet", ""]
    groups = [] if board.empty else board.groupby(["task", "dataset", "teacher", "student"], sort=False)
    for (task, dataset, teacher, student), part in groups:
        lines += [f"## {title(task, dataset, part['metric'].iloc[0], teacher, student, best)}", "",
                  "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(part)]
        lines.append("")
    if not board.empty:
        lines += [estimate_line(interval, trim), ""]
        if ((board["n"] < MIN_SEEDS) & (board["method"] != "teacher")).any():
            lines += [f"Some cells have fewer than {MIN_SEEDS} seeds: one seed cannot rank methods.", ""]
    seeds = seed_lines(board, seed_rule)
    if seeds:
        lines += [f"## Seeds until precise (first {seed_rule['first']}, max {seed_rule['max']}, "
                  f"until the gain's interval is within +-{seed_rule['until']['gain_ci_half_width']:g})", ""]
        lines += [f"- {md_text(line)}" for line in seeds] + [""]
    marks = tuned_lines(board, tuned)
    if marks:
        lines += ["## Tuned configurations", ""] + [f"- {md_text(m)}" for m in marks] + [""]
    from . import equal_compute as ec
    table = ec.equal_compute(df, board, best, interval, trim, tolerance)
    if not table.empty:
        lines += ["## Gain at equal schedule and at equal compute", "", "| " + " | ".join(ec.HEADER) + " |",
                  "|" + "---|" * len(ec.HEADER)]
        lines += ["| " + " | ".join(map(md_text, cells)) + " |" for cells in ec.table_rows(table)]
        lines += [""] + [f"- {md_text(n)}" for n in ec.notes(table)] + [""]
    from .papers import paper_lines
    papers = paper_lines(board, trials)
    if papers:
        lines += ["## The papers' numbers", ""] + [f"- {md_text(p)}" for p in papers] + [""]
    warns = warnings_for(df, board)
    if warns:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warns] + [""]
    lines += _search_markdown(rows)
    fails = failures(df)
    if fails:
        lines += [f"## {len(fails)} trial(s) without a result (not in the leaderboard)", ""]
        lines += [f"- {f}" for f in fails] + [""]
    sentence = in_one_sentence(board)
    if sentence:
        lines += [sentence, ""]
    return "\n".join(lines)


def in_one_sentence(board: pd.DataFrame) -> str:
    """What the leaderboard shows, in one sentence made from it: which distillers'
    gains over the student alone are distinguishable from seed noise (the paired test,
    at least MIN_SEEDS seeds), which are not, and which cells have too few seeds."""
    if board.empty:
        return ""
    cells = distilled_cells(board)
    if cells.empty:
        return ""

    def name(r: Any) -> str:
        return f"{r.method} on {r.dataset} ({r.gain:+.1f})"
    up = [name(r) for r in cells.itertuples() if r.distinguishable == "yes" and r.gain > 0]
    down = [name(r) for r in cells.itertuples() if r.distinguishable == "yes" and r.gain < 0]
    unclear = [name(r) for r in cells.itertuples() if r.distinguishable == "no"]
    few = [name(r) for r in cells.itertuples() if r.distinguishable not in ("yes", "no")]
    parts = []
    if up:
        parts.append(f"{', '.join(up)} {'beats' if len(up) == 1 else 'beat'} the student alone beyond seed noise")
    if down:
        parts.append(f"{', '.join(down)} {'does' if len(down) == 1 else 'do'} worse than the student alone "
                     f"beyond seed noise")
    if unclear:
        parts.append(f"{', '.join(unclear)} cannot be told from the student alone")
    if few:
        parts.append(f"{', '.join(few)} had too few seeds to tell (fewer than {MIN_SEEDS})")
    return "In one sentence: " + "; ".join(parts) + f" (paired t-test over seeds, p < {ALPHA})."


def _search_markdown(df: pd.DataFrame) -> list[str]:
    """Each search's section, from the store's rows as read (escaped here: a schedule is
    JSON, read before it is printed)."""
    lines = []
    for s in searches(df):
        lines += [f"## Search {md_text(s['search_id'])} ({md_text(s['cell'])})", "",
                  f"{len(s['trials'])} configuration(s), {sum(t['status'] == 'pruned' for t in s['trials'])} "
                  f"stopped early by ASHA. Best: "
                  + (f"{md_text(s['best']['params'])} ({s['best']['score']:.2f})" if s["best"] else "none finished"),
                  "", "| params | status | seeds | score |", "|---|---|---|---|"]
        lines += [f"| {md_text(t['params'])} | {md_text(t['status'])} | {t['seeds']} | {_f(t['score'], '.2f')} |"
                  for t in s["trials"]]
        lines.append("")
    return lines


def format_report(df: pd.DataFrame, best: bool = False, datasets: dict[str, dict[str, Any]] | None = None,
                  interval: str = "t", trim: bool = False, trials: list[dict[str, Any]] | None = None,
                  seed_rule: dict[str, Any] | None = None, tolerance: float = 0.1,
                  tuned: dict[str, str] | None = None) -> str:
    """What ``run`` and ``report`` print: the Markdown leaderboard."""
    return to_markdown(df, best, datasets, interval, trim, trials, seed_rule, tolerance, tuned)
