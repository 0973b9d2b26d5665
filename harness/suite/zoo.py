"""Models named by an OpenMMLab config: any config bundled with the installed mmdet or
mmseg (``mmdet::gfl/gfl_r50_fpn_1x_coco.py``, ``mmseg::pspnet/...``), or a config file
in a data format (YAML / JSON) from the user's disk.

A config is read with mmengine's ``Config`` (its ``_base_`` files inside the package
included; no torch is imported) and described as an architecture entry like the
catalog's (:func:`describe`): its task, its detector family (which selects a method's
per-family defaults), the strides of the FPN levels feature distillers tap, which heads
hold the class count and which keys follow the neck's width, and the head types a
head-based distiller must support. The catalog's ``arch:`` names are short names for
bundled configs described the same way, with their recorded metadata.

A ``.py`` config outside the installed packages runs code when read; it is refused
unless the command line allows it (``--allow-python-configs``, :data:`ALLOW_PYTHON_ENV`).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

#: set (to 1) by ``--allow-python-configs``: a suite may name a ``.py`` config from disk
ALLOW_PYTHON_ENV = "KD_HARNESS_ALLOW_PYTHON_CONFIGS"
#: config files a suite may name from the user's disk without running code
DATA_SUFFIXES = (".yaml", ".yml", ".json")
#: package scopes whose bundled configs a suite may name
SCOPES = {"mmdet": "det", "mmseg": "seg"}

#: a detector's dense head type -> its family (FGD's per-family weights come from these)
DENSE_FAMILIES = {"RetinaHead": "one_stage", "GFLHead": "one_stage", "ATSSHead": "one_stage",
                  "FCOSHead": "fcos", "RepPointsHead": "reppoints", "FreeAnchorRetinaHead": "one_stage"}
#: segmentor types (the rest of a config's model types are detectors)
SEGMENTORS = ("EncoderDecoder", "CascadeEncoderDecoder")


def resolve(ref: str) -> Path:
    """``"mmdet::retinanet/x.py"`` -> the file inside the installed package (found without
    importing it); a plain path as given."""
    if "::" not in ref:
        return Path(ref)
    package, rel = ref.split("::", 1)
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"config '{ref}': package '{package}' is not installed")
    path = Path(spec.origin).parent / ".mim" / "configs" / rel
    if not path.is_file():
        raise FileNotFoundError(f"config '{ref}': no file {path} in the installed {package}")
    return path


def check_reference(ref: str) -> str | None:
    """Why ``ref`` cannot name a config (None when it can): an unknown scope, a missing
    file, or a ``.py`` file from disk without ``--allow-python-configs``."""
    if "::" in ref:
        scope = ref.split("::", 1)[0]
        if scope not in SCOPES:
            return f"the scope '{scope}::' is not one of {', '.join(s + '::' for s in SCOPES)}"
        try:
            resolve(ref)
        except FileNotFoundError as exc:
            return str(exc)
        return None
    path = Path(ref)
    if not path.is_file():
        return f"'{ref}' is not a file"
    if path.suffix == ".py" and os.environ.get(ALLOW_PYTHON_ENV) != "1":
        return ("a .py config from disk runs code when it is read; give a YAML or JSON config, a bundled one "
                "(mmdet::... / mmseg::...), or pass --allow-python-configs to harness run / plan / tune")
    if path.suffix not in DATA_SUFFIXES + (".py",):
        return f"'{ref}' is not a config file (YAML, JSON, or .py with --allow-python-configs)"
    return None


def model_config(ref: str) -> dict[str, Any]:
    """The ``model`` of a config, as a plain dict."""
    from mmengine.config import Config
    return Config.fromfile(str(resolve(ref))).model.to_dict()


def _in_strides(backbone: dict[str, Any]) -> list[int]:
    """Strides of the backbone outputs the neck receives (ResNet-like: 4, 8, 16, 32 for
    out_indices 0-3)."""
    return [4 * 2 ** i for i in backbone.get("out_indices", (0, 1, 2, 3))]


def describe(ref: str, model: dict[str, Any] | None = None) -> dict[str, Any]:
    """The architecture entry of config ``ref`` (see the module docstring). ``model``: its
    model config when already read."""
    cfg = model if model is not None else model_config(ref)
    name = Path(ref.split("::", 1)[-1]).stem
    kind = cfg.get("type", "")
    if kind in SEGMENTORS:
        heads = [cfg["decode_head"]] + (cfg.get("auxiliary_head") or []
                                        if isinstance(cfg.get("auxiliary_head"), list)
                                        else [cfg["auxiliary_head"]] if cfg.get("auxiliary_head") else [])
        return dict(name=name, task="seg", family="seg", levels=(), config=ref, stages=0,
                    head_types=tuple(h["type"] for h in heads))
    neck = cfg.get("neck") or {}
    neck = neck[-1] if isinstance(neck, list) else neck
    strides = _in_strides(cfg.get("backbone", {}))
    start, outs = int(neck.get("start_level", 0)), int(neck.get("num_outs", len(strides)))
    base = strides[start] if start < len(strides) else strides[-1]
    all_levels = tuple(base * 2 ** k for k in range(outs))
    if "roi_head" in cfg:
        roi = cfg["roi_head"]
        follows = ["rpn_head.in_channels", "roi_head.bbox_roi_extractor.out_channels", "roi_head.bbox_head.in_channels"]
        class_heads = ["roi_head.bbox_head"]
        if roi.get("mask_head") is not None:
            follows += ["roi_head.mask_roi_extractor.out_channels", "roi_head.mask_head.in_channels"]
            class_heads.append("roi_head.mask_head")
        bbox = roi["bbox_head"]
        bbox_type = bbox[0]["type"] if isinstance(bbox, list) else bbox["type"]
        return dict(name=name, task="det", family="two_stage", stages=2, config=ref,
                    # FPN gives P2-P6; feature distillers tap P2-P5 (the RPN alone sees P6)
                    levels=all_levels[:-1] if len(all_levels) > 4 else all_levels, neck_levels=all_levels,
                    head="roi_head.bbox_head", class_heads=tuple(class_heads), follows_neck=tuple(follows),
                    head_types=(cfg["rpn_head"]["type"], roi["type"], bbox_type)
                    + ((roi["mask_head"]["type"],) if roi.get("mask_head") else ()))
    head = cfg["bbox_head"]
    return dict(name=name, task="det", family=DENSE_FAMILIES.get(head["type"], "one_stage"), stages=1, config=ref,
                levels=all_levels, head="bbox_head", follows_neck=("bbox_head.in_channels",),
                head_types=(head["type"],))


def head_types(model: dict[str, Any], arch: Any) -> tuple[str, ...]:
    """The head types of a suite model: (dense head or RPN, then for two-stage detectors
    the RoI head, its bbox head and mask head), as its config builds them: recorded in
    the catalog for its architectures, read from the config for a ``config:`` model."""
    meta = model.get("arch_meta") or {}
    return tuple(meta.get("head_types") or arch.get("head_types") or ("",))
