"""OpenMMLab config helpers shared by the task engines: merging a suite's overrides into
a config (where a ``package::path`` config lives is :func:`harness.suite.zoo.resolve`)."""
from __future__ import annotations

from typing import Any


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in, mapping by mapping (a suite's overrides of a config)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
