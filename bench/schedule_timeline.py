"""Benchmark: how a finished run used its time, from its rows (``started_at``, ``ended_at``).

Prints each trial's start and end (seconds from the run's first start), how long a
distilled student waited after its own teacher ended, and the run's figures: wall span
(first start to last end), the sum of trial times, the critical path (the longest chain
teacher -> student; a student alone is a chain of one) and the lower bound on the span
that the observed concurrency allows, max(critical path, sum / concurrency). With no
barrier a student starts when its own teacher ends and a slot is free, whatever the
other teachers are doing; the figure "students started before the last teacher ended"
shows it.

Run by hand after a run:  .venv/bin/python bench/schedule_timeline.py results/demo
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.store import results  # noqa: E402


def timeline(path: str | os.PathLike) -> tuple[pd.DataFrame, dict[str, float]]:
    try:
        df = results.read_results(path)
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from None
    df = df[df["status"] == "ok"].drop_duplicates("trial_id").copy()
    if df.empty:
        raise SystemExit(f"no finished trials under {path}")
    df["start"] = pd.to_datetime(df["started_at"], utc=True)
    df["end"] = pd.to_datetime(df["ended_at"], utc=True)
    t0 = df["start"].min()
    df["t_start"] = (df["start"] - t0).dt.total_seconds()
    df["t_end"] = (df["end"] - t0).dt.total_seconds()
    df["seconds"] = df["t_end"] - df["t_start"]
    teachers = df[df["role"] == "teacher"].set_index(["dataset", "teacher"])
    own_end, own_seconds = [], []
    for _, row in df.iterrows():
        key = (row["dataset"], row["teacher"])
        has_teacher = row["role"] == "student" and row["teacher"] and key in teachers.index
        own_end.append(teachers.loc[key, "t_end"] if has_teacher else float("nan"))
        own_seconds.append(teachers.loc[key, "seconds"] if has_teacher else 0.0)
    df["teacher_end"], df["teacher_seconds"] = own_end, own_seconds
    df["waited"] = df["t_start"] - df["teacher_end"]
    students = df[df["role"] == "student"]
    chains = students["seconds"] + students["teacher_seconds"]
    edges = sorted([(s, 1) for s in df["t_start"]] + [(e, -1) for e in df["t_end"]], key=lambda x: (x[0], x[1]))
    running = concurrency = 0
    for _, step in edges:
        running += step
        concurrency = max(concurrency, running)
    last_teacher = teachers["t_end"].max() if len(teachers) else 0.0
    figures = {
        "span": df["t_end"].max(),
        "sum": df["seconds"].sum(),
        "critical_path": max(chains.max() if len(chains) else 0.0, teachers["seconds"].max() if len(teachers) else 0.0),
        "concurrency": concurrency,
        "students_before_last_teacher": int((students["t_start"] < last_teacher).sum()),
        "students": len(students),
    }
    figures["lower_bound"] = max(figures["critical_path"], figures["sum"] / concurrency)
    return df.sort_values("t_start"), figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a results directory, e.g. results/demo")
    args = parser.parse_args()
    df, f = timeline(args.results)
    print(f"machine: {platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"{platform.system()} {platform.release()})")
    print(f"{'trial':60s} {'start':>7s} {'end':>7s} {'seconds':>8s} {'waited':>7s}")
    for _, row in df.iterrows():
        waited = "" if pd.isna(row["waited"]) else f"{row['waited']:7.1f}"
        print(f"{row['trial_name'][:60]:60s} {row['t_start']:7.1f} {row['t_end']:7.1f} {row['seconds']:8.1f} {waited:>7s}")
    print(f"span {f['span']:.1f} s; trials {f['sum']:.1f} s in all at up to {f['concurrency']} at once; "
          f"critical path {f['critical_path']:.1f} s; lower bound {f['lower_bound']:.1f} s "
          f"(span / bound {f['span'] / f['lower_bound']:.2f})")
    print(f"students started before the last teacher ended: {f['students_before_last_teacher']} of {f['students']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
