"""What a finished trial measured (:class:`TrialResult`) and the rows it leaves in the
results store's schema: one per metric, or one row saying why there is none."""
from __future__ import annotations

import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from harness import catalog
from harness.store import results
from harness.suite.spec import TrialSpec, content_hash


@dataclass
class TrialResult:
    """What a finished trial measured."""

    metrics: dict[str, float]
    epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    train_images_per_s: float = float("nan")
    device: str = "cpu"
    checkpoint: str | None = None
    #: provenance and cost (results schema v2)
    device_count: int = 0
    peak_memory_mb: float = float("nan")
    train_images_per_s_no_teacher: float = float("nan")
    teacher_time_share: float = float("nan")
    teacher_sha256: str = ""
    teacher_weights_hash: str = ""
    dataset_fingerprint: str = ""
    #: epoch (or iteration) the trial resumed from after a crash; 0 when it started afresh
    resumed_from: int = 0
    workers: int = 1
    #: optimizer steps the trial trained (results schema v5)
    train_iters: int = 0



def result_rows(spec: TrialSpec, outcome: TrialResult | None, error: str, wall: float,
                status: str = "error", started: datetime | None = None,
                search_id: str = "", placement: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The trial's rows in the store's schema: one per metric, or one row with
    ``status`` (error, diverged, interrupted, pruned, dry_run) and the message.
    ``placement``: where Ray ran it (node, node_ip, accelerator_ids, attempts)."""
    import json
    metric_entry = catalog.METRICS.get(catalog.task_metric(spec.dataset["format"]))
    now = datetime.now(timezone.utc)
    started = started or now
    res = spec.resources
    workers = outcome.workers if outcome is not None else int(res.get("workers", 1))
    devices = (float(res.get("gpu") or 0) or float(res.get("cpu") or 1)) * workers
    o = outcome or TrialResult(metrics={}, epoch=-1)
    where = {"node": "", "node_ip": "", "accelerator_ids": [], "attempts": 1, **(placement or {})}
    base = {
        "node": str(where["node"]), "node_ip": str(where["node_ip"]),
        "accelerator_ids": json.dumps([str(i) for i in where["accelerator_ids"]]),
        "workers": workers, "resumed_from": o.resumed_from, "attempts": int(where["attempts"]),
        "versions": json.dumps(results.package_versions(), sort_keys=True),
        "dataset_fingerprint": o.dataset_fingerprint, "schedule_hash": content_hash(spec.schedule),
        "schedule": json.dumps(spec.schedule, sort_keys=True, default=str),
        "teacher_sha256": o.teacher_sha256, "teacher_weights_hash": o.teacher_weights_hash,
        "device_count": o.device_count, "started_at": started.isoformat(timespec="milliseconds"),
        "ended_at": now.isoformat(timespec="milliseconds"), "device_hours": wall / 3600 * devices,
        "peak_memory_mb": o.peak_memory_mb, "train_images_per_s_no_teacher": o.train_images_per_s_no_teacher,
        "teacher_time_share": o.teacher_time_share, "search_id": search_id,
        "schema_version": results.SCHEMA_VERSION, "suite": spec.suite, "trial_id": spec.trial_id,
        "trial_name": spec.name, "task": spec.task, "dataset": spec.dataset["name"], "role": spec.role,
        "teacher": spec.model["name"] if spec.role == "teacher" else (spec.teacher or {}).get("name", ""),
        "student": "" if spec.role == "teacher" else spec.model["name"],
        "method": spec.method, "method_name": spec.method_name, "params": results.params_json(spec.params),
        "seed": spec.seed, "higher_is_better": metric_entry["higher_is_better"],
        "wall_time_s": wall, "code_version": results.code_version(),
        "config_hash": content_hash(spec.to_dict()),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data_warnings": "[]",          # the driver fills in its dataset check's (RunState.write_rows)
        "train_iters": o.train_iters if outcome is not None else 0,
        "matched_to": (spec.matched or {}).get("to", ""),
        "matched_target_hours": float((spec.matched or {}).get("target_device_hours", float("nan"))),
    }
    def best(name: str) -> tuple[float, int, str]:
        curve = [(int(p["epoch"]), float(p[name])) for p in outcome.history if name in p]
        pick = max if metric_entry["higher_is_better"] else min
        b_epoch, b_value = pick(curve, key=lambda c: c[1]) if curve else (-1, float("nan"))
        return b_value, b_epoch, json.dumps(curve)

    rows = [] if outcome is None else [
        dict(base, metric=name, value=value, primary=name == metric_entry["primary"], epoch=outcome.epoch,
             status="ok", error="", train_images_per_s=outcome.train_images_per_s, device=outcome.device,
             **dict(zip(("best_value", "best_epoch", "curve"), best(name))))
        for name, value in outcome.metrics.items() if name in metric_entry["keys"]]
    if outcome is not None and not rows:
        error = (f"the evaluation gave none of {metric_entry.name}'s metrics "
                 f"({', '.join(metric_entry['keys'])}); it gave {sorted(outcome.metrics)}")
    return rows or [dict(base, metric=metric_entry["primary"] if status == "dry_run" else "", value=float("nan"),
                         primary=False, epoch=-1, status=status,
                         error=error, train_images_per_s=float("nan"), device=platform.node(),
                         best_value=float("nan"), best_epoch=-1, curve="[]")]
