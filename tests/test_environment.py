"""The user's own environment: ranges in pyproject.toml and the lock beside them; pip
installing the harness into an environment that satisfies the ranges installs nothing
heavy (pip's own resolver report, against the environment these tests run in); the
mmcv build plan on GPU machines; and the device check before any work, simulated."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from harness.suite.load import load_suite
from harness.suite.yamlio import SuiteError

REPO = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "torchvision", "mmcv", "mmdet", "mmsegmentation", "mmengine", "ray"}


def _name(req: str) -> str:
    return re.split(r"[\[=<>!~ ;]", req, maxsplit=1)[0].lower()


def test_dependencies_are_ranges_and_the_lock_pins_each_within_them():
    from packaging.requirements import Requirement
    deps = [Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    lock = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            lock[name.lower()] = version
    for dep in deps:
        assert not any(s.operator == "==" for s in dep.specifier), f"{dep}: a range, not a pin"
        if dep.name.lower() in HEAVY:
            assert dep.specifier, f"{dep.name}: state the supported range"
            assert dep.specifier.contains(lock[dep.name.lower()]), f"the lock's {dep.name} is outside {dep}"


def test_installing_into_an_environment_that_satisfies_the_ranges_installs_nothing_but_the_harness(tmp_path):
    """pip's resolver, asked to install the project (editable) into the environment these
    tests run in, plans to install the project alone: no torch, no mmcv, nothing heavy.
    --no-index: nothing could be fetched even if something were missing."""
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
                           "--disable-pip-version-check", "--quiet", "--report", str(report), "-e", str(REPO)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    planned = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert planned == {"kd-harness"}, f"pip would install {sorted(planned)}"


def _plan():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import mmcv_build
    finally:
        sys.path.pop(0)
    return mmcv_build


def test_the_mmcv_build_plan_follows_the_machine():
    plan = _plan().build_plan
    assert plan("2.14.1+cpu", None, [], None) == {"FORCE_CUDA": "0", "MMCV_CACHE_TAG": "torch2.14.1"}
    gpu = plan("2.14.1+cu128", "12.8", [(9, 0), (8, 0), (9, 0)], "/opt/no-such-cuda/bin/nvcc")
    assert gpu["FORCE_CUDA"] == "1" and gpu["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0"
    assert gpu["MMCV_CACHE_TAG"] == "torch2.14.1-cu12.8-sm80_90" and gpu["CUDA_HOME"] == "/opt/no-such-cuda"
    with pytest.raises(SystemExit, match=r"nvcc is not.*CUDA 12\.8 toolkit"):
        plan("2.14.1+cu128", "12.8", [(9, 0)], None)
    with pytest.raises(SystemExit, match="CPU build"):
        plan("2.14.1+cpu", None, [(9, 0)], "/usr/bin/nvcc")


def _gpu_suite(write_suite, gpu: float):
    text = write_suite().read_text().replace("resources: {cpu: 1, gpu: 0}", f"resources: {{cpu: 1, gpu: {gpu}}}")
    return load_suite(write_suite(text))


def test_the_device_check_passes_on_the_cpu_and_names_missing_cuda_ops(write_suite, monkeypatch):
    from mmcv import ops

    from harness.run.devices import check_devices
    check_devices(_gpu_suite(write_suite, 0))                      # this machine: CPU ops run
    suite = _gpu_suite(write_suite, 1)
    monkeypatch.setattr(ops, "get_compiling_cuda_version", lambda: "not available")
    with pytest.raises(SuiteError, match=r"asks for a GPU, but the installed mmcv was built without CUDA ops.*"
                                         r"FORCE_CUDA=1"):
        check_devices(suite)


def test_the_device_check_names_an_mmcv_built_against_another_torch(write_suite, monkeypatch):
    import mmcv

    from harness.run.devices import check_devices

    class Broken:
        def __getattr__(self, name):
            raise ImportError("/x/mmcv/_ext.cpython-311-x86_64-linux-gnu.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")
    monkeypatch.setattr(mmcv, "ops", Broken())
    monkeypatch.setitem(sys.modules, "mmcv.ops", Broken())
    with pytest.raises(SuiteError, match=r"compiled ops do not load with torch .*built against another torch.*"
                                         r"scripts/setup_env\.sh"):
        check_devices(_gpu_suite(write_suite, 0))


def test_run_refuses_a_gpu_suite_on_an_mmcv_without_cuda_ops_before_anything_starts(write_suite, monkeypatch,
                                                                                    capsys, tmp_path):
    """Through the command: the cluster (given by --address, so the local GPU count is not
    judged here) asks for GPUs; the check refuses before Ray is contacted."""
    from mmcv import ops

    from harness.cli import main
    path = write_suite(write_suite().read_text().replace("resources: {cpu: 1, gpu: 0}", "resources: {cpu: 1, gpu: 1}"))
    monkeypatch.setattr(ops, "get_compiling_cuda_version", lambda: "not available")
    from harness.run import session
    monkeypatch.setattr(session, "probe_address", lambda address: None)     # a cluster that answers
    assert main(["run", str(path), "--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "built without CUDA ops" in err and "Traceback" not in err
    assert not (tmp_path / "results").exists()
