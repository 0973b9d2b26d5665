"""Exports that OpenMMLab's own tools score the same: a trial's exported student (and a
harness-trained teacher) has its complete config beside it, and mmdet's / mmseg's
``tools/test.py`` (the copies shipped inside the installed packages, run as a user runs
them) give the metric the trial's rows hold. The config mmengine dumps into the trial's
directory is that config too (it was 1 byte)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.run.trial import run_trial
from harness.suite.load import load_suite

from .test_seg import SEG_SUITE


def _tool(package: str, name: str) -> Path:
    import importlib.util
    return Path(importlib.util.find_spec(package).origin).parent / ".mim" / "tools" / name


def _run_tool(package: str, config: Path, weights: Path, work_dir: Path) -> dict:
    """``python <package>/.mim/tools/test.py CONFIG WEIGHTS --work-dir DIR``; the metrics it
    logged (mmengine writes them to <work_dir>/<timestamp>/<timestamp>.json)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, str(_tool(package, "test.py")), str(config), str(weights),
                           "--work-dir", str(work_dir)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    logs = sorted(work_dir.glob("*/*.json"))
    assert logs, f"tools/test.py wrote no metrics under {work_dir}: {done.stdout[-2000:]}"
    return json.loads(logs[-1].read_text().strip().splitlines()[-1])


EXPORT_SUITE = """
name: export
pretrained: false
datasets:
  shapes: {{format: coco, root: {root}, synth: {{train_images: 16, val_images: 8, image_size: 64, max_objects: 2, seed: 1}}}}
teachers:
  t: {{arch: retinanet, backbone: {{depth: 18, base_channels: 8}}, neck: {{out_channels: 16}},
      head: {{feat_channels: 16, stacked_convs: 1, norm_cfg: {{type: GN, num_groups: 4}}}},
      model: {{test_cfg: {{score_thr: 0.0}}}}}}
students:
  s: {{arch: retinanet, backbone: {{depth: 18, base_channels: 8}}, neck: {{out_channels: 16}},
      head: {{feat_channels: 16, stacked_convs: 1, norm_cfg: {{type: GN, num_groups: 4}}}},
      model: {{test_cfg: {{score_thr: 0.0}}}}}}
pairs: [[t, s]]
methods: [none]
seeds: [0]
# 24 epochs: enough for an AP the export could get wrong (about 0.03, AP50 about 0.1)
schedule: {{epochs: 24, val_interval: 24, batch_size: 4, lr: 0.02, warmup_iters: 0, img_scale: [64, 64]}}
resources: {{cpu: 1, gpu: 0}}
output: {output}
"""


def _rows_value(spec, metric: str) -> float:
    """The value the trial's row in the results store holds."""
    from harness.store import results
    df = results.read_results(spec.output_dir)
    row = df[(df.trial_id == spec.trial_id) & (df.metric == metric)]
    assert len(row) == 1 and row.status.iloc[0] == "ok", row
    return float(row.value.iloc[0])


def test_mmdet_tools_test_scores_an_exported_student_as_the_trial_did(tmp_path):
    from harness.run.trial import execute_trial
    path = tmp_path / "suite.yaml"
    path.write_text(EXPORT_SUITE.format(root=tmp_path / "shapes", output=tmp_path / "results"))
    suite = load_suite(path)
    teacher = next(t for t in suite.trials if t.role == "teacher")
    student = next(t for t in suite.trials if t.role == "student")
    for spec in (teacher, student):
        rows, exc = execute_trial(spec, log_level="WARNING")           # writes its rows to the store
        assert exc is None, exc
    t_config = Path(teacher.teacher_checkpoint).with_suffix(".py")      # a harness-trained teacher's
    s_config = student.trial_dir / "student.py"
    assert t_config.is_file() and s_config.is_file()
    dumped = [p for p in student.trial_dir.glob("*.py") if p.name != "student.py"]
    assert dumped and all(p.stat().st_size > 1000 for p in dumped), "the Runner's dumped config is empty"
    for spec, config, weights in ((teacher, t_config, Path(teacher.teacher_checkpoint)),
                                  (student, s_config, student.trial_dir / "student.pth")):
        got = _run_tool("mmdet", config, weights, tmp_path / f"test-{spec.role}")
        assert _rows_value(spec, "bbox_mAP_50") > 0.01, "a trained model: an AP the export could get wrong"
        for metric in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75"):
            assert got[f"coco/{metric}"] == pytest.approx(_rows_value(spec, metric), abs=1e-4), metric


def test_mmseg_tools_test_scores_an_exported_student_as_the_trial_did(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text(SEG_SUITE.format(root=tmp_path / "cs", output=tmp_path / "results")
                    .replace("methods: [pixel_kd, icsd]", "methods: [none]"))
    suite = load_suite(path)
    student = next(t for t in suite.trials if t.role == "student")
    result = run_trial(student, log_level="WARNING")
    got = _run_tool("mmseg", student.trial_dir / "student.py", Path(result.checkpoint), tmp_path / "test")
    assert got["mIoU"] / 100 == pytest.approx(result.metrics["mIoU"], abs=1e-4)
    assert got["aAcc"] / 100 == pytest.approx(result.metrics["aAcc"], abs=1e-4)
