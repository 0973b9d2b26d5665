"""OpenMMLab config helpers shared by the task engines: where a ``package::path``
config lives in the installed package (:func:`harness.suite.zoo.resolve`), and merging a
suite's overrides into it."""
from __future__ import annotations

from typing import Any

from harness.suite.zoo import resolve as resolve_config_path  # noqa: F401 - the engines' name for it


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in, mapping by mapping (a suite's overrides of a config)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
