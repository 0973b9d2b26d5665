"""Each gain at equal schedule and at equal compute.

A distilled trial pays for the teacher's forward, so the student alone given the same
device-hours trains longer. A suite with ``baselines: {compute_matched: true}`` also
trains, per distilled cell and seed, the student alone on a stretched schedule
(:mod:`harness.run.matched`); here each seed's distilled trial is paired with the
student-alone trial (the plain one or a stretched one) whose device-hours come closest
to its own, and the gain over it gets its interval and paired t-test as a leaderboard's
gain does. A seed whose closest baseline is off by more than the suite's tolerance is
named, never silently averaged in.
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from .stats import (display_scale, distilled_cells, matched, paired_gain, paired_p_value, suite_rows, value_column,
                    verdict)

HEADER = ["method", "gain, equal schedule [95% CI]", "p", "gain, equal compute [95% CI]", "p",
          "distinguishable at equal compute",
          "student alone's iterations", "device-hours, alone / distilled"]


def _per_trial(rows: pd.DataFrame, scale: float) -> pd.DataFrame:
    """One row per trial: seed, value (display units), device-hours, iterations."""
    return rows.groupby("trial_id").agg(seed=("seed", "first"), v=("v", "mean"), hours=("device_hours", "first"),
                                        iters=("train_iters", "first")).assign(v=lambda t: t["v"] * scale)


def equal_compute(df: pd.DataFrame, board: pd.DataFrame, best: bool = False, interval: str = "t",
                  trim: bool = False, tolerance: float = 0.1) -> pd.DataFrame:
    """One row per distilled cell that has compute-matched baselines: its gain at equal
    schedule (the leaderboard's) and at equal compute, each with its 95% interval and
    paired test, the student alone's iterations on either schedule, and how close the
    device-hours came per seed (``off``: the seeds outside ``tolerance``)."""
    rows = suite_rows(df)
    if board.empty or not matched(rows).any():
        return pd.DataFrame()
    ok = rows[(rows["status"] == "ok") & rows["primary"]].copy()
    ok["v"] = value_column(ok, best)
    stretched = ok[matched(ok)]
    plain = ok[~matched(ok)]
    out: list[dict[str, Any]] = []
    for r in distilled_cells(board).itertuples():
        same = (plain["dataset"] == r.dataset) & (plain["student"] == r.student)
        m_rows = stretched[(stretched["dataset"] == r.dataset) & (stretched["student"] == r.student)
                           & (stretched["matched_to"] == f"{r.teacher}/{r.method}")]
        if m_rows.empty:
            continue
        scale, higher = display_scale(r.metric), bool(ok[ok["dataset"] == r.dataset]["higher_is_better"].iloc[0])
        cell = _per_trial(plain[same & (plain["teacher"] == r.teacher) & (plain["method"] == r.method)], scale)
        alone = _per_trial(plain[same & (plain["method"] == "none")], scale)
        candidates = pd.concat([alone, _per_trial(m_rows, scale)])
        distilled, chosen, ratios, iters = {}, {}, {}, []
        for seed, target in cell.set_index("seed")["hours"].items():
            pool = candidates[candidates["seed"] == seed]
            if pool.empty or not target > 0:
                continue
            pick = pool.loc[(pool["hours"] / target - 1).abs().idxmin()]
            distilled[seed] = float(cell[cell["seed"] == seed]["v"].iloc[0])
            chosen[seed], ratios[seed] = float(pick["v"]), float(pick["hours"] / target)
            iters.append(pick["iters"])
        values, base = pd.Series(distilled, dtype=float), pd.Series(chosen, dtype=float)
        gain, lo, hi, n = paired_gain(values, base, higher, interval, trim)
        p = paired_p_value(values, base, trim)
        out.append(dict(dataset=r.dataset, teacher=r.teacher, student=r.student, method=r.method, metric=r.metric,
                        schedule_gain=r.gain, schedule_lo=r.gain_lo, schedule_hi=r.gain_hi, schedule_p=r.p_value,
                        gain=gain, gain_lo=lo, gain_hi=hi, p_value=p, n=n, distinguishable=verdict(p, n),
                        alone_iters=float(alone["iters"].mean()), matched_iters=float(pd.Series(iters).mean()),
                        ratio_lo=min(ratios.values(), default=math.nan), ratio_hi=max(ratios.values(), default=math.nan),
                        off=sorted(s for s, q in ratios.items() if abs(q - 1) > tolerance), tolerance=tolerance))
    return pd.DataFrame(out)


def _gain(g: float, lo: float, hi: float) -> str:
    return "-" if math.isnan(g) else f"{g:+.2f}" + ("" if math.isnan(lo) else f" [{lo:+.2f}, {hi:+.2f}]")


def table_rows(table: pd.DataFrame) -> list[list[str]]:
    """The section's cells, one list per distilled cell (the same for Markdown and HTML)."""
    def p(v: float) -> str:
        return "-" if math.isnan(v) else f"{v:.3f}"
    return [[f"{r.method} ({r.dataset}: {r.teacher} -> {r.student})",
             _gain(r.schedule_gain, r.schedule_lo, r.schedule_hi), p(r.schedule_p),
             _gain(r.gain, r.gain_lo, r.gain_hi), p(r.p_value), r.distinguishable,
             f"{r.alone_iters:.0f} -> {r.matched_iters:.0f}", f"{r.ratio_lo:.2f} to {r.ratio_hi:.2f}"]
            for r in table.itertuples()]


def notes(table: pd.DataFrame) -> list[str]:
    """What the section measured, and each cell whose device-hours did not come close enough."""
    if table.empty:
        return []
    tol = float(table["tolerance"].iloc[0])
    out = [f"Equal compute: each seed's distilled trial against the student alone trained on a schedule of the same "
           f"shape stretched (more iterations) until its device-hours came within {tol:.0%} of the distilled "
           f"trial's; paired over seeds, as the leaderboard's gains are."]
    for r in table.itertuples():
        if r.off:
            out.append(f"{r.method} on {r.dataset} ({r.teacher} -> {r.student}): seed(s) {r.off} have no baseline "
                       f"within {tol:.0%} of their device-hours (ratios {r.ratio_lo:.2f} to {r.ratio_hi:.2f}); "
                       f"their equal-compute gain compares unequal compute")
    return out


def points(df: pd.DataFrame, best: bool = False) -> pd.DataFrame:
    """The compute-matched baselines for a plot: per (dataset, student, cell matched to),
    the mean metric (display units) and the mean device-hours per trial."""
    rows = suite_rows(df)
    rows = rows[matched(rows) & (rows["status"] == "ok") & rows["primary"]].copy()
    if rows.empty:
        return pd.DataFrame()
    rows["v"] = value_column(rows, best) * rows["metric"].map(display_scale)
    per_trial = rows.groupby("trial_id").agg(dataset=("dataset", "first"), student=("student", "first"),
                                             to=("matched_to", "first"), v=("v", "mean"), hours=("device_hours", "first"))
    return per_trial.groupby(["dataset", "student", "to"], as_index=False)[["v", "hours"]].mean()
