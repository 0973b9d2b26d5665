"""Leaderboards from a results store: per dataset and (teacher, student) pair, the
teacher's own score, the student alone, and every method with its mean and spread over
seeds, gain over the student alone (with a 95% confidence interval over the seeds both
ran: Student's t on the paired differences, scipy), share of the teacher-student gap
closed, and cost.
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd
from scipy import stats

from . import catalog


def paired_gain(method: pd.Series, alone: pd.Series, higher_is_better: bool = True) -> tuple[float, float, float, int]:
    """Mean gain over the student alone on the seeds both ran, its 95% confidence
    interval (Student's t on the per-seed differences) and the number of pairs.
    ``method`` and ``alone`` are indexed by seed. Fewer than two pairs give no interval."""
    diff = (method - alone).dropna() * (1.0 if higher_is_better else -1.0)
    n = len(diff)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(diff.mean())
    if n < 2:
        return mean, math.nan, math.nan, n
    sem = float(stats.sem(diff))
    if sem == 0:
        return mean, mean, mean, n
    lo, hi = stats.t.interval(0.95, n - 1, loc=mean, scale=sem)
    return mean, float(lo), float(hi), n


def _scale(metric: str) -> float:
    """AP is stored in [0, 1]; leaderboards show points (x100) as papers do. The factor
    is the registered metric's ``display_scale``."""
    for entry in catalog.METRICS:
        if metric in entry["keys"]:
            return float(entry.get("display_scale", 1.0))
    return 1.0


def leaderboard(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, teacher, student, method) on the primary metric."""
    ok = df[(df["status"] == "ok") & (df["primary"])]
    rows: list[dict[str, Any]] = []
    for (task, dataset), part in ok.groupby(["task", "dataset"], sort=True):
        metric = part["metric"].iloc[0]
        scale = _scale(metric)
        higher = bool(part["higher_is_better"].iloc[0])
        teachers = part[part["role"] == "teacher"].groupby("teacher")["value"].mean() * scale
        alone = part[part["method"] == "none"].groupby("student")["value"]
        alone_mean = alone.mean() * scale
        alone_seeds = part[part["method"] == "none"].groupby(["student", "seed"])["value"].mean() * scale
        students = part[part["role"] == "student"]
        pairs = list(students[students["teacher"] != ""][["teacher", "student"]]
                     .drop_duplicates().itertuples(index=False, name=None))
        paired = {s for _, s in pairs} | {t for t, _ in pairs}
        pairs += [("", s) for s in alone_mean.index if s not in paired]     # only the student alone ran
        pairs += [(t, "") for t in teachers.index if t not in paired]       # only the teacher ran
        for teacher, student in pairs:
            t_score = teachers.get(teacher, math.nan)
            base = alone_mean.get(student, math.nan)
            if teacher:
                rows.append(dict(task=task, dataset=dataset, teacher=teacher, student=student, method="teacher",
                                 metric=metric, mean=t_score, std=math.nan, n=int(teacher in teachers.index),
                                 gain=math.nan, gain_lo=math.nan, gain_hi=math.nan, gap_closed=math.nan,
                                 wall_time_s=math.nan, images_per_s=math.nan))
            sel = students[(students["student"] == student)
                           & ((students["teacher"] == teacher) | (students["method"] == "none"))]
            for method, m in sel.groupby("method", sort=False):
                values = m.groupby("seed")["value"].mean() * scale
                mean = values.mean()
                sign = 1.0 if higher else -1.0
                gain = sign * (mean - base)
                gap = sign * (t_score - base)      # only a teacher better than the student has a gap
                base_seeds = alone_seeds[student] if student in alone_seeds.index.get_level_values(0) else pd.Series(dtype=float)
                _, lo, hi, _ = paired_gain(values, base_seeds, higher) if method != "none" else (0, math.nan, math.nan, 0)
                rows.append(dict(
                    task=task, dataset=dataset, teacher=teacher, student=student, method=method, metric=metric,
                    mean=mean, std=values.std(ddof=1) if len(values) > 1 else math.nan, n=len(values),
                    gain=gain if method != "none" else 0.0, gain_lo=lo, gain_hi=hi,
                    gap_closed=gain / gap if method != "none" and gap > 0 else math.nan,
                    wall_time_s=m.groupby("trial_id")["wall_time_s"].first().mean(),
                    images_per_s=m.groupby("trial_id")["train_images_per_s"].first().mean()))
    board = pd.DataFrame(rows)
    if board.empty:
        return board
    order = {"teacher": 0, "none": 1}
    board["_o"] = board["method"].map(lambda m: order.get(m, 2))
    return board.sort_values(["task", "dataset", "teacher", "student", "_o", "method"]).drop(columns="_o")


def format_report(df: pd.DataFrame) -> str:
    """The printed report: a leaderboard block per dataset and pair, then any errors."""
    board = leaderboard(df)
    lines: list[str] = []
    if board.empty:
        lines.append("no successful trials yet")
    groups = [] if board.empty else board.groupby(["task", "dataset", "teacher", "student"], sort=False)
    for (task, dataset, teacher, student), part in groups:
        metric = part["metric"].iloc[0]
        lines.append(f"\n== {dataset} ({task}, {metric}{' x100' if _scale(metric) != 1 else ''}) "
                     f"teacher {teacher or '-'} -> student {student}")
        lines.append(f"{'method':<16}{'mean':>8}{'± std':>8}{'seeds':>6}{'gain':>8}{'95% CI of gain':>18}"
                     f"{'gap':>7}{'time s':>9}{'img/s':>8}")
        for r in part.itertuples():
            def f(v: float, fmt: str) -> str:
                return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)
            label = {"teacher": "teacher", "none": "student alone"}.get(r.method, r.method)
            ci = "" if math.isnan(r.gain_lo) else f"[{r.gain_lo:+.2f}, {r.gain_hi:+.2f}]" + (
                " *" if r.gain_lo > 0 or r.gain_hi < 0 else "")
            lines.append(f"{label:<16}{f(r.mean, '.2f'):>8}{f(r.std, '.2f'):>8}{r.n:>6}"
                         f"{f(r.gain, '+.2f'):>8}{ci:>18}{f(r.gap_closed, '.0%'):>7}{f(r.wall_time_s, '.0f'):>9}"
                         f"{f(r.images_per_s, '.1f'):>8}")
    if not board.empty and board["gain_lo"].notna().any():
        lines.append("\n* the 95% confidence interval of the gain excludes zero (paired seeds, Student's t)")
    errors = df[df["status"] != "ok"].drop_duplicates("trial_id")
    if len(errors):
        lines.append(f"\n{len(errors)} trial(s) without a result (not in the leaderboard):")
        for r in errors.itertuples():
            lines.append(f"  {r.trial_name} [{r.trial_id}] {r.status}: {r.error}")
    return "\n".join(lines).lstrip("\n")

