"""The statistics of a leaderboard cell, over seeds: the mean and its 95% interval, the
gain over the student alone on the paired seeds with its interval and a paired t-test,
and the verdict. Intervals are Student's t (default) or a bootstrap of the mean
(scipy.stats.bootstrap, percentile, 10,000 resamples, fixed seed), as lm-evaluation-harness
reports; ``olympic`` applies MLPerf's olympic scoring first (a cell's best and worst
runs dropped, for gains the best and worst paired differences). The paired t-test (and
so the verdict) is computed on the same values either way."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from harness import catalog

#: p-value under which a gain is called distinguishable from seed noise (paired t-test)
ALPHA = 0.05
#: fewer paired seeds than this cannot tell a gain from noise
MIN_SEEDS = 3


def display_scale(metric: str) -> float:
    """AP is stored in [0, 1]; leaderboards show points (x100) as papers do. The factor
    is the registered metric's ``display_scale``."""
    for entry in catalog.METRICS:
        if metric in entry["keys"]:
            return float(entry.get("display_scale", 1.0))
    return 1.0


def value_column(df: pd.DataFrame, best: bool) -> pd.Series:
    """Last-epoch values, or best-epoch ones (``best_value``; a v1 row has none: its last)."""
    if best and "best_value" in df:
        return df["best_value"].where(df["best_value"].notna(), df["value"])
    return df["value"]


def suite_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of suite trials; a search's trials have their own section (``searches.searches``)."""
    return df[df["search_id"].fillna("") == ""] if "search_id" in df else df


def matched(df: pd.DataFrame) -> pd.Series:
    """Which rows are compute-matched baselines (``matched_to`` set; results schema v5)."""
    return df["matched_to"].fillna("") != "" if "matched_to" in df else pd.Series(False, index=df.index)


def board_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The suite rows a leaderboard ranks: compute-matched baselines have their own
    section (:mod:`.equal_compute`)."""
    df = suite_rows(df)
    return df[~matched(df)]


def olympic(values: pd.Series) -> pd.Series:
    """MLPerf's olympic scoring: the values without the best and the worst one (three or
    more values; fewer are left as they are)."""
    values = values.dropna()
    return values.sort_values().iloc[1:-1] if len(values) >= 3 else values


def _interval(values: pd.Series, how: str) -> tuple[float, float]:
    """95% interval of the mean of ``values`` (two or more): Student's t, or a bootstrap."""
    mean = float(values.mean())
    if float(values.std(ddof=1)) == 0:
        return mean, mean
    if how == "bootstrap":
        res = stats.bootstrap((np.asarray(values, dtype=float),), np.mean, confidence_level=0.95,
                              n_resamples=10_000, method="percentile", random_state=0)
        return float(res.confidence_interval.low), float(res.confidence_interval.high)
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=float(stats.sem(values)))
    return float(lo), float(hi)


def paired_gain(method: pd.Series, alone: pd.Series, higher_is_better: bool = True, how: str = "t",
                trim: bool = False) -> tuple[float, float, float, int]:
    """Mean gain over the student alone on the seeds both ran, its 95% confidence
    interval (``how``: Student's t or a bootstrap, on the per-seed differences; ``trim``:
    olympic, the best and worst differences dropped first) and the number of pairs.
    ``method`` and ``alone`` are indexed by seed. Fewer than two pairs give no interval."""
    diff = (method - alone).dropna() * (1.0 if higher_is_better else -1.0)
    n = len(diff)
    if trim:
        diff = olympic(diff)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(diff.mean())
    if len(diff) < 2:
        return mean, math.nan, math.nan, n
    lo, hi = _interval(diff, how)
    return mean, lo, hi, n


def paired_p_value(method: pd.Series, alone: pd.Series, trim: bool = False) -> float:
    """Two-sided paired t-test (scipy.stats.ttest_rel) on the seeds both ran; ``trim``:
    on the differences left by olympic scoring (a one-sample t-test of them)."""
    both = pd.concat([method, alone], axis=1, join="inner").dropna()
    diff = both.iloc[:, 0] - both.iloc[:, 1]
    if trim:
        diff = olympic(diff)
    if len(diff) < 2:
        return math.nan
    if float(diff.std(ddof=1)) == 0:
        return 0.0 if float(diff.mean()) != 0 else 1.0
    if trim:
        return float(stats.ttest_1samp(diff, 0.0).pvalue)
    return float(stats.ttest_rel(both.iloc[:, 0], both.iloc[:, 1]).pvalue)


def mean_interval(values: pd.Series, how: str = "t") -> tuple[float, float]:
    """95% confidence interval of the mean over seeds (``how``: Student's t or a
    bootstrap); NaN below two seeds."""
    values = values.dropna()
    if len(values) < 2:
        return math.nan, math.nan
    return _interval(values, how)


def verdict(p: float, n: int) -> str:
    """Whether a gain is distinguishable from noise: 'yes', 'no', or 'n<3' (too few seeds)."""
    if n < MIN_SEEDS:
        return f"n<{MIN_SEEDS}"
    return "yes" if p < ALPHA else "no"


def distilled_cells(board: pd.DataFrame) -> pd.DataFrame:
    """The rows of a leaderboard that report a gain: each distilled method of a (teacher,
    student) pair, not the teacher's own row nor the student alone."""
    return board[~board["method"].isin(["teacher", "none"]) & (board["teacher"] != "")]


def stop_reason(n: int, gain_lo: float, gain_hi: float, rule: dict) -> str:
    """Why a cell of a seed rule's run has the seeds it has."""
    half = (gain_hi - gain_lo) / 2
    target, most = float(rule["until"]["gain_ci_half_width"]), int(rule["max"])
    if math.isfinite(half) and half <= target:
        return f"precise: the gain's interval is +-{half:.2f}, within +-{target:g}"
    if n >= most:
        return f"max seeds ({most}) reached: the interval is +-{half:.2f}, wider than +-{target:g}"
    return f"not finished: {n} seed(s), the interval +-{half:.2f} (a failed trial, or the run was stopped)"
