"""The papers' numbers beside ours: for each distilled cell of a leaderboard, the seed
paper's headline result whose setup it matches (``catalog.PAPER_RESULTS``: the method
and the parameters the result needs, the dataset format, the teacher and the student as
built, on real data), with the difference in gain, the schedule when it differs and how
the source's setup differs from the one the harness can build. A cell no entry matches
gets a line saying so, and naming the nearest entry and what differs. The cells' setups
come from the suite as last run (``suite.json``'s trials)."""
from __future__ import annotations

from typing import Any

import pandas as pd

from harness import catalog

from .stats import distilled_cells

# what defines a model as built: its config or architecture and their overrides
_MODEL_KEYS = ("config", "arch", "backbone", "neck", "head", "model")
# a setup further from every entry than this has no nearest one worth naming
_NEAREST = 2


def model_setup(model: Any) -> dict[str, Any] | None:
    """A model as built, comparable across a catalog entry and a trial: the config (or the
    architecture, without a config) and the overrides given."""
    if model is None:
        return None
    if isinstance(model, str):
        return {"config": model} if "::" in model or model.endswith((".py", ".yaml", ".yml", ".json")) \
            else {"arch": model}
    setup = {k: model[k] for k in _MODEL_KEYS if model.get(k)}
    if "config" in setup:
        setup.pop("arch", None)      # a config's derived architecture name adds nothing
    return setup


def _describe(setup: dict[str, Any] | None) -> str:
    if setup is None:
        return "any"
    name = setup.get("config") or setup.get("arch")
    extra = {k: v for k, v in setup.items() if k not in ("config", "arch")}
    return f"{name} {extra}" if extra else str(name)


def _setup(trials: list[dict[str, Any]], row: Any) -> dict[str, Any] | None:
    """The setup of a board cell, from one of its trials."""
    for t in trials:
        teacher = t.get("teacher") or {}
        if (t.get("dataset", {}).get("name") == row.dataset and t.get("model", {}).get("name") == row.student
                and teacher.get("name") == row.teacher and t.get("method") == row.method):
            return {"method": t.get("method_name"), "params": t.get("params") or {},
                    "format": t["dataset"].get("format"), "synthetic": bool(t["dataset"].get("synth")),
                    "teacher": model_setup(teacher), "student": model_setup(t["model"]),
                    "epochs": (t.get("schedule") or {}).get("epochs")}
    return None


def differences(entry: Any, setup: dict[str, Any]) -> list[str]:
    """What keeps a cell's setup from being the entry's (empty when it is)."""
    out = []
    if setup["format"] != entry["dataset_format"]:
        out.append(f"dataset format {setup['format']} (the paper's {entry['dataset_format']})")
    if setup["synthetic"]:
        out.append("synthetic data")
    for key, value in entry["params"].items():
        if setup["params"].get(key) != value:
            out.append(f"{key}: {setup['params'].get(key)!r} (the paper's {value!r})")
    for role in ("teacher", "student"):
        ours, theirs = setup[role], model_setup(entry[role])
        if theirs is not None and ours != theirs:
            out.append(f"{role} {_describe(ours)} (the paper's {_describe(theirs)})")
    return out


def match(setup: dict[str, Any]) -> tuple[Any, list[str]]:
    """The paper result measured in this setup and no difference; else the nearest result
    of the same method (fewest differences, two at most) and what differs; else (None, [])."""
    best, best_diff = None, []
    for entry in catalog.PAPER_RESULTS:
        if entry["method"] != setup["method"]:
            continue
        diff = differences(entry, setup)
        if not diff:
            return entry, []
        if best is None or len(diff) < len(best_diff):
            best, best_diff = entry, diff
    return (best, best_diff) if len(best_diff) <= _NEAREST else (None, [])


def _notes(entry: Any, setup: dict[str, Any]) -> str:
    notes = []
    if entry["epochs"] is None:
        notes.append("the source gives no schedule")
    elif setup["epochs"] != entry["epochs"]:
        notes.append(f"ours trained {setup['epochs']} epochs, the paper's {entry['epochs']}")
    if entry["teacher"] is None:
        notes.append("the source names no teacher")
    if entry["setup_note"]:
        notes.append(entry["setup_note"])
    return "".join(f"; {n}" for n in notes)


def paper_lines(board: pd.DataFrame, trials: list[dict[str, Any]] | None) -> list[str]:
    """One line per distilled cell: the paper's baseline -> distilled (gain) beside ours,
    the difference in gain, and what in the setup differs; or why there is nothing to set
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
        entry, diff = match(setup)
        if entry is None or diff:
            why = f"the nearest, {entry.name} [{entry['source']}], differs in: {'; '.join(diff)}" \
                if entry is not None else f"{setup['method']} on {setup['format']} data" \
                + (", synthetic" if setup["synthetic"] else "")
            out.append(f"{cell}: no paper result was measured in this setup ({why})")
            continue
        paper_gain = entry["distilled"] - entry["baseline"]
        base = board[(board["dataset"] == row.dataset) & (board["student"] == row.student)
                     & (board["method"] == "none")]["mean"]
        ours = f"{float(base.iloc[0]):.1f} -> {row.mean:.1f} ({row.gain:+.1f})" if len(base) else \
            f"{row.mean:.1f} (no student alone)"
        out.append(f"{cell}: the paper's {entry['baseline']:.1f} -> {entry['distilled']:.1f} ({paper_gain:+.1f}), "
                   f"ours {ours}: the gain differs by {row.gain - paper_gain:+.1f}{_notes(entry, setup)} "
                   f"[{entry['source']}]")
    return out
