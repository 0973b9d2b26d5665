"""How scripts/setup_env.sh builds mmcv's compiled ops on this machine.

    python scripts/mmcv_build.py        # prints shell assignments, or exits 3 saying what is missing

On a machine without a GPU the ops are built for the CPU. Where a CUDA device is
visible and ``nvcc`` is found (on PATH or under $CUDA_HOME), they are built with their
CUDA kernels for the architectures of the visible GPUs (``FORCE_CUDA=1``,
``TORCH_CUDA_ARCH_LIST``); the cached wheel's tag names torch's version, its CUDA and
those architectures, so a wheel is never reused for another torch or another card.
A GPU without ``nvcc`` cannot get CUDA ops: the script says what to install instead of
building a CPU-only mmcv whose first CUDA trial would fail deep inside an op.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def find_nvcc() -> str | None:
    """``nvcc`` on PATH, else under $CUDA_HOME (or /usr/local/cuda)."""
    found = shutil.which("nvcc")
    if found:
        return found
    home = Path(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda")
    candidate = home / "bin" / "nvcc"
    return str(candidate) if candidate.is_file() else None


def build_plan(torch_version: str, torch_cuda: str | None, capabilities: list[tuple[int, int]],
               nvcc: str | None) -> dict[str, str]:
    """The build's environment and the cache tag. Raises ``SystemExit(3)`` with what to
    install when a GPU is visible but its kernels cannot be compiled."""
    base = torch_version.split("+")[0]
    if not capabilities:
        return {"FORCE_CUDA": "0", "MMCV_CACHE_TAG": f"torch{base}"}
    if not torch_cuda:
        raise SystemExit(f"[setup] a GPU is visible but this torch ({torch_version}) is a CPU build: install a CUDA "
                         f"build of torch (https://pytorch.org/get-started/locally/), then run the set-up again")
    if nvcc is None:
        raise SystemExit(
            f"[setup] a GPU is visible but nvcc is not (looked on PATH and under $CUDA_HOME): mmcv's CUDA ops "
            f"cannot be built. Install the CUDA {torch_cuda} toolkit that this torch was built with (NVIDIA's "
            f"cuda-toolkit-{torch_cuda.replace('.', '-')} package, or conda install -c nvidia "
            f"cuda-nvcc={torch_cuda}), point CUDA_HOME at it and run the set-up again; or use your own environment "
            f"with OpenMMLab's prebuilt mmcv for torch {base} and CUDA {torch_cuda} (README: Use your own "
            f"environment)")
    archs = ";".join(f"{major}.{minor}" for major, minor in sorted(set(capabilities)))
    return {"FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": archs, "CUDA_HOME": str(Path(nvcc).resolve().parent.parent),
            "MMCV_CACHE_TAG": f"torch{base}-cu{torch_cuda}-sm{archs.replace(';', '_').replace('.', '')}"}


def main() -> int:
    import torch
    caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    try:
        plan = build_plan(torch.__version__, torch.version.cuda, caps, find_nvcc())
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 3
    for key, value in plan.items():
        print(f"{key}='{value}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
