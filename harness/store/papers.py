"""The papers' numbers beside ours: for each distilled cell of a leaderboard, the seed
paper's headline result whose setup it matches (``catalog.PAPER_RESULTS``: method,
dataset format, teacher and student configs, the student's epochs), with the difference
in gain; or a line saying that no paper setup matches. The cells' setups come from the
suite as last run (``suite.json``'s trials)."""
from __future__ import annotations

from typing import Any

import pandas as pd

from harness import catalog

from .stats import distilled_cells


def _setup(trials: list[dict[str, Any]], row: Any) -> dict[str, Any] | None:
    """The setup of a board cell, from one of its trials."""
    for t in trials:
        teacher = t.get("teacher") or {}
        if (t.get("dataset", {}).get("name") == row.dataset and t.get("model", {}).get("name") == row.student
                and teacher.get("name") == row.teacher and t.get("method") == row.method):
            return {"method": t.get("method_name"), "format": t["dataset"].get("format"),
                    "teacher": teacher.get("config") or teacher.get("arch"),
                    "student": t["model"].get("config") or t["model"].get("arch"),
                    "epochs": (t.get("schedule") or {}).get("epochs")}
    return None


def match(setup: dict[str, Any]) -> Any:
    """The paper result measured in this setup (method, format, both configs), or None."""
    for entry in catalog.PAPER_RESULTS:
        if (entry["method"], entry["dataset_format"], entry["teacher"], entry["student"]) == \
                (setup["method"], setup["format"], setup["teacher"], setup["student"]):
            return entry
    return None


def paper_lines(board: pd.DataFrame, trials: list[dict[str, Any]] | None) -> list[str]:
    """One line per distilled cell: the paper's baseline -> distilled (gain) beside ours,
    the difference in gain, and a schedule that differs; or why there is nothing to set
    beside it. Empty without the suite's trials (a lone Parquet file)."""
    if board.empty or not trials:
        return []
    out = []
    cells = distilled_cells(board)
    for row in cells.itertuples():
        setup = _setup(trials, row)
        cell = f"{row.method} on {row.dataset} ({row.teacher} -> {row.student})"
        if setup is None:
            continue
        entry = match(setup)
        if entry is None:
            out.append(f"{cell}: no paper result was measured in this setup ({setup['method']}, "
                       f"{setup['teacher']} -> {setup['student']}, {setup['format']})")
            continue
        paper_gain = entry["distilled"] - entry["baseline"]
        base = board[(board["dataset"] == row.dataset) & (board["student"] == row.student)
                     & (board["method"] == "none")]["mean"]
        ours = f"{float(base.iloc[0]):.1f} -> {row.mean:.1f} ({row.gain:+.1f})" if len(base) else \
            f"{row.mean:.1f} (no student alone)"
        epochs = "" if setup["epochs"] == entry["epochs"] else \
            f"; ours trained {setup['epochs']} epochs, the paper's {entry['epochs']}"
        out.append(f"{cell}: the paper's {entry['baseline']:.1f} -> {entry['distilled']:.1f} ({paper_gain:+.1f}), "
                   f"ours {ours}: the gain differs by {row.gain - paper_gain:+.1f}{epochs} [{entry['source']}]")
    return out
