"""A full disk during a run ends with the harness's own message, never a traceback, and
a rerun on a disk with room continues. The run's output lives on a small tmpfs (mounted
here: root only; skipped elsewhere) that fills up part-way."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, TINY_SUITE


# full as the teacher trains; full as a student trains (slow: the default run stays under 20 min)
@pytest.fixture(params=["1200k", pytest.param("5m", marks=pytest.mark.slow)])
def small_disk(tmp_path, request):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _run(suite: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", "run", str(suite), "--num-cpus", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, KD_HARNESS_OUTPUT_ROOT=str(tmp_path)))


def test_a_full_disk_ends_with_a_message_and_a_rerun_continues(tmp_path, small_disk, synth_coco):
    text = TINY_SUITE.format(root=synth_coco, output=small_disk / "out").replace("\n    synth: ", "\n    #synth: ")
    suite = tmp_path / "suite.yaml"
    suite.write_text(text)
    first = _run(suite, tmp_path)
    said = first.stdout + first.stderr
    assert first.returncode != 0, said[-3000:]
    assert "No space left on device" in said, said[-3000:]
    assert "Traceback" not in first.stderr, first.stderr[-3000:]
    # nothing cut short is left behind: no empty or partial error.txt, no training state
    # that was being written when the disk filled (a resume would skip it, a rerun needs
    # its room); where a trial could say so, it names the file being written
    from harness.run.states import _complete
    trials = small_disk / "out" / "trials"
    errors = list(trials.rglob("error.txt"))
    assert all(e.stat().st_size > 0 for e in errors), errors
    assert all(_complete(f) for f in [*trials.rglob("epoch_*.pth"), *trials.rglob("iter_*.pth")])
    full = [e.read_text() for e in errors if "No space left" in e.read_text()]
    assert all("the disk is full" in t and "was being written" in t for t in full), full
    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
    second = _run(suite, tmp_path)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    import pandas as pd
    rows = pd.concat([pd.read_parquet(f) for f in (small_disk / "out" / "rows").glob("*.parquet")])
    assert set(rows["status"]) == {"ok"} and rows["trial_id"].nunique() == 3


def test_a_disk_already_full_is_refused_before_ray_starts(tmp_path, synth_coco):
    """Under 1 MiB free where the run writes: exit 2 naming the key, the place and the free
    bytes, before Ray starts (nothing of Ray's is written) and before any trial."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=800k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        text = TINY_SUITE.format(root=synth_coco, output=disk / "out").replace("\n    synth: ", "\n    #synth: ")
        suite = tmp_path / "suite.yaml"
        suite.write_text(text)
        done = _run(suite, tmp_path)
        assert done.returncode == 2, (done.stdout + done.stderr)[-3000:]
        assert f"output: the disk of {disk} is full (" in done.stderr and "nothing was started" in done.stderr
        assert not (disk / "out").exists()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
