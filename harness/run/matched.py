"""Compute-matched baselines (``baselines: {compute_matched: true}``): for each distilled
trial, the student alone on the same seed, trained on a schedule of the same shape
stretched to more iterations, until its device-hours come within the tolerance of the
distilled trial's.

A trial's device-hours are not proportional to its iterations (building the models,
loading the data and the evaluations cost too), so the length is fitted: the first
attempt steps from the plain trial along its own measured cost of one training
iteration (Newton's method), each next one from the attempt before; once two trials lie
on either side of the target, the next is interpolated between them (a line fitted across whole trials without such a
bracket follows their fixed costs' noise). Every attempt is a trial of its own,
kept in the store; the report pairs each seed with the attempt that came closest
(:mod:`harness.store.equal_compute`). The plan is recomputed from the store each time,
so a resumed run finds the attempts already made and goes on from them.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pandas as pd

from harness.store import results
from harness.suite.load import Suite
from harness.suite.spec import TrialSpec


def stretched(schedule: dict[str, Any], iters: int) -> dict[str, Any]:
    """``schedule`` on ``iters`` iterations, same shape: the warm-up, the lr policy's
    milestones, cosine or poly at the same fractions of training, and as many
    evaluations (and saved states), evenly spread, the last at the end. (Evaluations
    are not training: one more of them would spend the compute being matched.)"""
    total = int(schedule.get("iters") or schedule["epochs"])
    out = dict(schedule, iters=int(iters))
    for key in ("val_interval", "checkpoint_interval"):
        if out.get(key):
            out[key] = max(1, math.ceil(iters / max(1, total // int(schedule[key]))))
    return out


def _next_iters(points: list[tuple[float, float, float]], target: float) -> int:
    """Iterations whose device-hours should be ``target``, from the (iterations,
    device-hours, device-hours per training iteration) of the trials so far, in the
    order they ran: between the two closest trials on either side of the target, a
    straight line; otherwise a Newton step from the latest along its own measured cost of
    an iteration (within one trial, so whole trials' noisy fixed costs do not enter it;
    the latest ran as the next will, iteration-based, in a round of its own), or
    proportional when that is unknown. At most 4x longer or shorter in one step."""
    below, above = [p for p in points if p[1] < target], [p for p in points if p[1] > target]
    i, h, per_iter = points[-1]
    lo, hi = (max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])) if below and above else (None, None)
    if lo and hi and hi[0] > lo[0]:
        n = lo[0] + (target - lo[1]) * (hi[0] - lo[0]) / (hi[1] - lo[1])
    elif per_iter > 0 and math.isfinite(per_iter):
        n = i + (target - h) / per_iter
    else:
        n = i * target / h
    return max(1, round(min(max(n, i / 4), i * 4)))


def _point(row: Any, batch_size: int) -> tuple[float, float, float]:
    """A finished trial's (iterations, device-hours, device-hours per training iteration):
    the last from its training throughput (images per second over training steps only)."""
    per_iter = float(row["device_hours"]) / float(row["wall_time_s"]) * batch_size * int(row["workers"] or 1) \
        / float(row["train_images_per_s"]) if row["wall_time_s"] > 0 and row["train_images_per_s"] > 0 else math.nan
    return float(row["train_iters"]), float(row["device_hours"]), per_iter


def plan_matched(trials: list[TrialSpec], df: pd.DataFrame | None, cfg: dict[str, Any]
                 ) -> tuple[list[TrialSpec], list[TrialSpec], list[str]]:
    """(every compute-matched trial made so far or to make now, those to run now, notes).
    ``trials``: the suite's matrix; ``df``: its store (all rows); ``cfg``: the suite's
    ``baselines``. A (cell, seed) whose plain student-alone trial already comes within
    the tolerance needs no stretched one; one whose attempt failed, or whose next length
    would repeat one already tried, stops there; at most ``attempts`` per (cell, seed)."""
    if df is None or df.empty:
        return [], [], []
    ok = df[(df["status"] == "ok") & df["primary"]].groupby("trial_id").first()
    failed = set(df[df["status"].isin(results.FAILED)]["trial_id"])     # (an interrupted one runs again)
    alone = {(t.dataset["name"], t.model["name"], t.seed): t for t in trials
             if t.role == "student" and t.method_name == "none" and not t.matched}
    every: list[TrialSpec] = []
    pending: list[TrialSpec] = []
    notes: list[str] = []
    tol = float(cfg["tolerance"])
    for spec in trials:
        if spec.role != "student" or spec.method_name == "none" or spec.trial_id not in ok.index:
            continue
        base = alone.get((spec.dataset["name"], spec.model["name"], spec.seed))
        if base is None or base.trial_id not in ok.index:
            continue
        target = float(ok.loc[spec.trial_id, "device_hours"])
        b_iters, b_hours = ok.loc[base.trial_id, "train_iters"], float(ok.loc[base.trial_id, "device_hours"])
        if not (target > 0 and b_hours > 0) or pd.isna(b_iters) or int(b_iters) <= 0:
            notes.append(f"{spec.name}: no compute-matched baseline (its store rows predate the iteration count, "
                         f"results schema v5)")
            continue
        batch = int(base.schedule["batch_size"])
        points = [_point(ok.loc[base.trial_id], batch)]
        for _ in range(int(cfg["attempts"])):
            if any(abs(h / target - 1) <= tol for _, h, _ in points):
                break
            n = _next_iters(points, target)
            if any(math.isclose(n, i) for i, _, _ in points):
                break               # the closest a whole number of iterations gets
            m = replace(base, schedule=stretched(base.schedule, n),
                        matched={"to": f"{spec.teacher['name']}/{spec.method}", "target_device_hours": target})
            every.append(m)
            if m.trial_id in ok.index:
                points.append(_point(ok.loc[m.trial_id], batch))
            elif m.trial_id in failed:
                notes.append(f"{m.name}: failed; this seed's equal-compute baseline is the closest before it")
                break
            else:
                pending.append(m)
                break
    return list({m.trial_id: m for m in every}.values()), list({m.trial_id: m for m in pending}.values()), notes


def matched_rounds(suite: Suite, summary: dict[str, Any], **run: Any) -> None:
    """Under ``baselines: {compute_matched: true}``: rounds of stretched student-alone
    trials (:func:`plan_matched`) until each distilled trial has one within the tolerance
    of its device-hours, or its attempts are spent (``run``: run_suite's session
    arguments); their trials join ``summary`` and the suite's record."""
    from . import matrix
    cfg = suite.doc["baselines"]
    if not cfg["compute_matched"]:
        return
    plain = [t for t in suite.trials if not t.matched]
    for round_no in range(1, int(cfg["attempts"]) + 2):
        every, pending, notes = plan_matched(plain, results.read_results(suite.output, current_only=False), cfg)
        suite.trials = plain + every
        if pending:
            print(f"\ncompute-matched baselines, round {round_no}: {len(pending)} stretched student-alone trial(s) "
                  f"(e.g. {pending[0].name}: {pending[0].schedule['iters']} iterations for "
                  f"{pending[0].matched['target_device_hours']:.4f} device-hours)", flush=True)
        more = matrix.run_suite(suite, resume=True, only={t.trial_id for t in pending}, **run)
        summary["trials"] += more["trials"]          # (none pending: the suite, with them, is recorded)
        if not pending:
            for note in notes:
                print(f"compute-matched baselines: {note}")
            return
