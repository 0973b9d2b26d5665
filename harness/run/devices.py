"""Before Ray starts: do mmcv's compiled ops run on every device kind the suite asks for?

A suite whose trials ask for GPUs on an mmcv built without CUDA kernels (the CPU build
``scripts/setup_env.sh`` makes where there is no nvcc), or an mmcv compiled against
another torch than the one installed (its extension then fails to load with an
undefined symbol), would pass every check and fail inside the first trial's first NMS
or RoIAlign, long after the suite was accepted. This module runs one op per device kind
the suite needs, in seconds, and names the fix. Whether the cluster has the GPUs at
all is :func:`harness.run.session.check_resources`'s question.
"""
from __future__ import annotations

from typing import Any

from harness.suite.yamlio import SuiteError

REBUILD = ("rebuild it against the installed torch: remove the cached wheel (~/.cache/kd-harness/wheels/mmcv-*) "
           "and the stamp (.venv/.kd-harness-stamp), then run scripts/setup_env.sh; or install OpenMMLab's mmcv "
           "wheel for your torch and CUDA (README: Use your own environment)")


def _ops() -> Any:
    """mmcv's compiled ops; a load failure says which build is at fault."""
    import mmcv
    try:
        from mmcv import ops
        ops.nms                      # noqa: B018 - loads the extension
        return ops
    except (ImportError, OSError) as exc:
        import torch
        raise SuiteError(f"mmcv {mmcv.__version__}'s compiled ops do not load with torch {torch.__version__} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}): it was built against another "
                         f"torch; {REBUILD}") from None


def _nms_runs(ops: Any, device: str) -> None:
    import torch
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0]], device=device)
    ops.nms(boxes, torch.tensor([0.9, 0.8], device=device), 0.5)


def check_devices(suite: Any) -> None:
    """Raise :class:`SuiteError` naming the fix when mmcv's ops cannot run on a device
    kind the suite's trials ask for (the CPU always; CUDA for ``gpu > 0``)."""
    tasks = {t.task for t in suite.trials}
    if not tasks & {"det", "seg"}:            # torchvision classifiers use no mmcv op
        return
    ops = _ops()
    try:
        _nms_runs(ops, "cpu")
    except RuntimeError as exc:
        raise SuiteError(f"mmcv's compiled ops fail on the CPU ({exc}); {REBUILD}") from None
    wants_gpu = [t for t in suite.trials if float(t.resources.get("gpu") or 0) > 0]
    if not wants_gpu:
        return
    import torch
    where = suite.where.get("resources", suite.file)
    compiled = ops.get_compiling_cuda_version()
    if compiled in ("not available", "", None):
        raise SuiteError(f"{where}: resources: trial {wants_gpu[0].name} asks for a GPU, but the installed mmcv was "
                         f"built without CUDA ops (its CUDA version: {compiled}); build them where the GPU and nvcc "
                         f"are (scripts/setup_env.sh does, with FORCE_CUDA=1 for the visible GPUs), or install "
                         f"OpenMMLab's mmcv wheel for torch {torch.__version__} and CUDA {torch.version.cuda}")
    if not torch.cuda.is_available():
        return                                # a cluster's GPUs are elsewhere: check_resources judges them
    try:
        _nms_runs(ops, "cuda")
    except RuntimeError as exc:
        raise SuiteError(f"mmcv's CUDA ops (built for CUDA {compiled}) fail on this GPU "
                         f"({torch.cuda.get_device_name()}): {str(exc).splitlines()[0][:200]}; {REBUILD}") from None
