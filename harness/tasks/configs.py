"""OpenMMLab config helpers shared by the task engines: where a ``package::path``
config lives in the installed package, and merging a suite's overrides into it."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any


def resolve_config_path(ref: str) -> Path:
    """``"mmdet::retinanet/x.py"`` -> the file inside the installed package; plain paths as given."""
    if "::" not in ref:
        return Path(ref)
    package, rel = ref.split("::", 1)
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"config '{ref}': package '{package}' is not installed")
    path = Path(spec.origin).parent / ".mim" / "configs" / rel
    if not path.is_file():
        raise FileNotFoundError(f"config '{ref}': no file {path}")
    return path


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in, mapping by mapping (a suite's overrides of a config)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
