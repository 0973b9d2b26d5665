"""The CLI: plan and ls import no backend; errors exit 2 with the message."""
from __future__ import annotations

import subprocess
import sys

from .conftest import REPO


def _run(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_help_lists_every_command():
    out = _run("--help").stdout
    for cmd in ("run", "plan", "ls", "report", "data"):
        assert cmd in out


def test_plan_and_ls_import_no_backend(write_suite):
    path = write_suite()
    code = ("import sys; from harness.cli import main; "
            f"assert main(['plan', {str(path)!r}]) == 0; assert main(['ls']) == 0; "
            "heavy = [m for m in ('torch', 'mmdet', 'mmengine', 'mmcv', 'ray') if m in sys.modules]; "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tiny" in proc.stdout and "t->s/fgd/s0" in proc.stdout and "fgd" in proc.stdout


def test_plan_error_exits_2_with_message(write_suite, tmp_path):
    path = write_suite(TINY_SUITE_BAD.format(root=tmp_path))
    proc = _run("plan", str(path))
    assert proc.returncode == 2
    assert "unknown method 'fdg'" in proc.stderr and "did you mean 'fgd'" in proc.stderr


def test_data_synth(tmp_path):
    proc = _run("data", "synth", "coco", "--out", str(tmp_path / "c"), "--train-images", "2",
                "--val-images", "1", "--image-size", "32")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "c" / "annotations" / "instances_val2017.json").is_file()


TINY_SUITE_BAD = """
datasets: {{d: {{format: coco, root: {root}}}}}
teachers: {{t: {{arch: retinanet}}}}
students: {{s: {{arch: retinanet}}}}
pairs: [[t, s]]
methods: [fdg]
"""


def test_preflight_builds_every_model_of_a_mixed_suite(tmp_path, monkeypatch):
    """The demo mixes detection, segmentation and classification; preflight builds all."""
    monkeypatch.chdir(tmp_path)                 # the demo's relative data roots land here
    from harness.data.formats import ensure_dataset
    from harness.run.preflight import preflight
    from harness.suite.load import load_suite
    suite = load_suite(REPO / "suites" / "demo.yaml")
    assert {t.task for t in suite.trials} == {"det", "seg", "cls"}
    for ds in {t.dataset["root"]: t.dataset for t in suite.trials}.values():
        ensure_dataset(ds)
    preflight(suite)


def test_a_closed_pipe_ends_quietly_not_as_a_full_disk(monkeypatch):
    """Output piped into ``head`` that closes early: BrokenPipeError (an OSError) exits 0
    without the full-disk message the OSError handler prints."""
    import io

    from harness import cli

    def closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(cli, "_cmd_ls", closed_pipe)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert cli.main(["ls"]) == 0
    assert err.closed                                     # nothing more is written to the closed pipe's side


def test_counts_given_on_the_command_line_are_checked_naming_the_flag(tmp_path):
    """``--num-cpus 0`` / ``-1`` names the flag (it was blamed on the suite's resources,
    after Ray's start); ``data synth`` takes the suite's ``synth:`` bounds (``--train-images
    -5`` wrote an empty dataset and exited 0; ``--image-size 0`` was a traceback)."""
    for args, flag in ((["run", "suites/demo.yaml", "--num-cpus", "0"], "--num-cpus: 0 is out of range"),
                       (["tune", "suites/demo.yaml", "--num-cpus", "-1"], "--num-cpus: -1 is out of range"),
                       (["data", "synth", "coco", "--out", str(tmp_path / "d"), "--train-images", "-5"],
                        "--train-images: -5 is out of range: valid 1 to 1000000"),
                       (["data", "synth", "coco", "--out", str(tmp_path / "d"), "--image-size", "0"],
                        "--image-size: 0 is out of range: valid 16 to 4096")):
        done = _run(*args)
        assert done.returncode == 2 and flag in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "d").exists()


def test_only_the_path_written_is_checked_not_its_siblings(tmp_path):
    """``data synth --out data/tiny`` beside an ordinary ``data/coco -> /datasets/coco``
    link and a looping link: written (both used to refuse it); writing through the
    outside link itself is still refused."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "coco").symlink_to("/usr")                    # outside every allowed place
    (data / "loop").symlink_to("loop")
    done = _run("data", "synth", "coco", "--out", "data/tiny", "--train-images", "1", "--val-images", "1",
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (data / "tiny" / "annotations").is_dir()
    refused = _run("data", "synth", "coco", "--out", "data/coco/x", "--train-images", "1", cwd=tmp_path)
    assert refused.returncode == 2 and "will not write" in refused.stderr and "outside" in refused.stderr
