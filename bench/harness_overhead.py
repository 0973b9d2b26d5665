"""Benchmark: the harness's own cost, on the machine it runs on.

(a) Short real trials through `harness run` (Ray Tune, driver-written rows, checkpoints,
    progress) against the same trials run directly with `run_trial` in one process,
    one after the other in both cases (one CPU per trial). Reported: total wall time of
    each and the harness's overhead in percent, also as projected onto a 60-second trial
    (the fixed cost per trial over 60 s).
(b) Scheduling and recording N no-op trials (`run --dry-run`), end to end: Ray start,
    Tune, one Parquet row file per trial, the consolidated store (skipped with --noop 0).
(c) Start-up: from the command to the first trial running (its row's start), for a dry
    run of the tiny suite, and the whole dry run. The checks before any trial (data,
    every model built) run while Ray starts.

Targets (issue 10): under 5% on a 60-second trial; 200 no-op trials in under 60 s on
2 cores.

Run by hand:  .venv/bin/python bench/harness_overhead.py [--trials 3] [--epochs 6] [--noop 200]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SUITE = """
name: overhead
pretrained: false
datasets:
  shapes:
    format: coco
    root: {root}
    synth: {{train_images: 16, val_images: 8, image_size: 64, max_objects: 3, seed: 1}}
teachers:
  t: {{arch: retinanet, backbone: {{depth: 18, base_channels: 8}}, neck: {{out_channels: 16}},
      head: {{feat_channels: 16, stacked_convs: 1}}, schedule: {{epochs: 1}}}}
students:
  s: {{arch: retinanet, backbone: {{depth: 18, base_channels: 8}}, neck: {{out_channels: 16}},
      head: {{feat_channels: 16, stacked_convs: 1}}}}
pairs: [{{teacher: t, student: s}}]
methods: [none]
seeds: {seeds}
schedule: {{epochs: {epochs}, val_interval: 1, batch_size: 4, lr: 0.01, warmup_iters: 0, img_scale: [64, 64]}}
resources: {{cpu: 1, gpu: 0}}
output: {output}
"""


def _harness(args: list[str], cwd: Path) -> float:
    env = dict(os.environ, KD_HARNESS_OUTPUT_ROOT=str(cwd), PYTHONPATH=str(REPO), KD_HARNESS_LOG_LEVEL="WARNING")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=3, help="real student trials in (a)")
    p.add_argument("--epochs", type=int, default=6, help="epochs of each real trial in (a)")
    p.add_argument("--noop", type=int, default=200, help="no-op trials in (b)")
    p.add_argument("--startup-only", type=int, default=0, metavar="N",
                   help="only (c), N times (the data written once first), with the median")
    args = p.parse_args()
    print(f"machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    work = Path(tempfile.mkdtemp(prefix="kd-overhead-"))
    try:
        if args.startup_only:
            _startup_only(work, args.startup_only)
            return
        # (a) the same trials, through the harness and directly
        suite = work / "real.yaml"
        suite.write_text(SUITE.format(root=work / "data", seeds=list(range(args.trials)), epochs=args.epochs,
                                      output=work / "real"))
        _harness(["run", str(suite), "--num-cpus", "1"], work)          # the teacher, and a warm data cache
        shutil.rmtree(work / "real" / "rows")
        shutil.rmtree(work / "real" / "trials")
        from harness.suite.load import load_suite
        specs = [t for t in load_suite(suite, output_roots=[str(work)]).trials if t.role == "student"]
        through = _harness(["run", str(suite), "--num-cpus", "1"], work)
        os.environ["KD_HARNESS_LOG_LEVEL"] = "WARNING"
        from harness.run.trial import run_trial
        start = time.perf_counter()
        for spec in specs:
            shutil.rmtree(spec.trial_dir, ignore_errors=True)
            run_trial(spec)
        direct = time.perf_counter() - start
        # what a run costs once, whatever its trials: the process, Ray's start and stop,
        # Tune, the store, the report (a one-trial dry run)
        once_suite = work / "once.yaml"
        once_suite.write_text(SUITE.format(root=work / "data", seeds=[0], epochs=1, output=work / "once"))
        once = _harness(["run", str(once_suite), "--dry-run", "--num-cpus", "1"], work)     # (two no-op trials)
        per_trial = (through - direct) / len(specs)
        per_trial_run = max(0.0, (through - direct - once) / len(specs))
        print(f"(a) {len(specs)} trials of {args.epochs} epochs: harness {through:.1f} s, direct run_trial "
              f"{direct:.1f} s: +{100 * (through - direct) / direct:.1f}% here; {per_trial:.2f} s per trial with "
              f"the run's start-up ({once:.1f} s: process, Ray, Tune, store, report) spread over them, "
              f"{per_trial_run:.2f} s per trial without it = {100 * per_trial_run / 60:.1f}% of a 60-second trial")
        # (b) no-op trials
        if args.noop > 0:
            noop = work / "noop.yaml"
            noop.write_text(SUITE.format(root=work / "data", seeds=list(range(args.noop)), epochs=1,
                                         output=work / "noop"))
            took = _harness(["run", str(noop), "--dry-run"], work)
            print(f"(b) {args.noop + 1} no-op trials (dry run), scheduled and recorded: {took:.1f} s "
                  f"({took / (args.noop + 1) * 1000:.0f} ms per trial)")
        else:
            print("(b) skipped (--noop 0)")
        _startup(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _startup(work: Path, tag: str = "start") -> tuple[float, float]:
    """(c) start-up: the command's start to the first trial's (rows record it to the
    millisecond), and the whole dry run of the tiny suite."""
    import pandas as pd
    from datetime import datetime, timezone
    start_suite = work / f"{tag}.yaml"
    start_suite.write_text(SUITE.format(root=work / "data", seeds=[0], epochs=1, output=work / tag))
    began = datetime.now(timezone.utc)
    whole = _harness(["run", str(start_suite), "--dry-run"], work)
    rows = pd.read_parquet(work / tag / "rows")
    first = (min(datetime.fromisoformat(t) for t in rows["started_at"]) - began).total_seconds()
    print(f"(c) start-up: the first trial ran {first:.1f} s after the command (target: 10 s); the whole dry "
          f"run of {len(rows)} trials took {whole:.1f} s", flush=True)
    return first, whole


def _startup_only(work: Path, times: int) -> None:
    import statistics
    _startup(work, "warm")                  # writes the synthetic data and caches its check, as a second run finds
    got = [_startup(work, f"start{i}") for i in range(times)]
    firsts = sorted(g[0] for g in got)
    print(f"(c) over {times} runs: first trial after {firsts[0]:.1f}-{firsts[-1]:.1f} s (median "
          f"{statistics.median(firsts):.1f} s); whole dry run median {statistics.median(g[1] for g in got):.1f} s")


if __name__ == "__main__":
    main()
