"""A hyperparameter search's section of a report: per search and searched cell, its
configurations (method parameters and the schedule keys it varied, with their values),
their scores and statuses, and the best. Rendered by :mod:`.report` (Markdown) and
:mod:`.html_report`."""
from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from .stats import display_scale


def searches(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Per search and searched cell (dataset, pair, method): its configurations (method
    parameters, and the schedule keys the search varied with their values), their
    scores and statuses, and the best configuration."""
    if "search_id" not in df:
        return []
    out = []
    keys = ["search_id", "dataset", "teacher", "student", "method"]
    for (sid, dataset, teacher, student, method), part in df[df["search_id"].fillna("") != ""].groupby(keys, sort=True):
        several = part["schedule_hash"].nunique() > 1
        varied = _varied_schedule(part) if several else {}
        trials = []
        for (params, sched, status), p in part.groupby(["params", "schedule_hash", "status"], sort=False):
            prim = p[p["primary"]] if status == "ok" else p
            label = params if not several else f"{params} schedule {varied[sched]}" if sched in varied else \
                f"{params} schedule {sched[:8]}"          # (rows from before the schedule was stored)
            trials.append({"params": label, "status": status,
                           "seeds": int(p["seed"].nunique()),
                           "score": float(prim["value"].mean()) * display_scale(str(prim["metric"].iloc[0]))
                           if status == "ok" and len(prim) else math.nan})
        ok = [t for t in trials if t["status"] == "ok"]
        higher = bool(part["higher_is_better"].iloc[0])
        best = (max if higher else min)(ok, key=lambda t: t["score"]) if ok else None
        out.append({"search_id": sid, "cell": f"{dataset}: {teacher or '-'} -> {student}, {method}", "trials": trials,
                    "best": best})
    return out


def _varied_schedule(part: pd.DataFrame) -> dict[str, str]:
    """Schedule hash -> the schedule keys the search varied and their values (``lr
    0.0106, weight_decay 0.000269``), for the hashes whose rows carry their schedule."""
    schedules = {}
    for sched, text in part[["schedule_hash", "schedule"]].dropna().drop_duplicates("schedule_hash").itertuples(
            index=False):
        schedules[sched] = json.loads(text)
    keys = sorted({k for s in schedules.values() for k in s
                   if len({json.dumps(o.get(k), sort_keys=True) for o in schedules.values()}) > 1})
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else json.dumps(v)      # noqa: E731
    return {h: ", ".join(f"{k} {fmt(s.get(k))}" for k in keys) for h, s in schedules.items()}
