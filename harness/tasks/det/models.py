"""Building the models a suite names: mmdet detectors from the architecture's bundled
config plus the suite's overrides. The backbone starts from the pretrained weights the
config names, with its frozen stage and BN statistics, unless the suite says otherwise
(:mod:`harness.tasks.pretrained`).
"""
from __future__ import annotations

import copy
from typing import Any

from harness import catalog
from harness.suite.zoo import resolve as resolve_config_path
from harness.tasks.configs import merge as _merge
from harness.tasks.pretrained import backbone_checkpoint

_RESNET_EXPANSION = {18: 1, 34: 1, 50: 4, 101: 4, 152: 4}
_RESNETS = ("ResNet", "ResNetV1d", "ResNeXt")     # same stage widths for a given depth


def resnet_channels(backbone: dict[str, Any]) -> list[int] | None:
    """Output channels of a ResNet backbone's stages (out_indices), or None if not a ResNet."""
    if backbone.get("type") not in _RESNETS or backbone.get("depth") not in _RESNET_EXPANSION:
        return None
    base = backbone.get("base_channels", 64) * _RESNET_EXPANSION[backbone["depth"]]
    return [base * 2 ** i for i in backbone.get("out_indices", (0, 1, 2, 3))]


def detector_cfg(model: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """The mmdet model config (a plain dict) for a suite model entry."""
    from mmengine.config import Config

    arch = catalog.arch_of(model)
    cfg = Config.fromfile(str(resolve_config_path(arch["config"]))).model.to_dict()
    over = model.get("backbone", {})
    backbone = _merge(cfg["backbone"], over)
    bundled_ckpt = (cfg["backbone"].get("init_cfg") or {}).get("checkpoint")
    ckpt = backbone_checkpoint(model.get("name", model["arch"]), model.get("pretrained", True), bundled_ckpt,
                               cfg["backbone"], backbone)
    backbone["init_cfg"] = dict(type="Pretrained", checkpoint=ckpt) if ckpt else None
    if ckpt is None and backbone.get("type") in _RESNETS:
        # from scratch, a frozen random stem and frozen random BN statistics cannot work
        backbone["frozen_stages"] = over.get("frozen_stages", -1)
        backbone["norm_eval"] = over.get("norm_eval", False)
    cfg["backbone"] = backbone
    neck_over = dict(model.get("neck", {}))
    channels = resnet_channels(backbone)
    if channels is not None and "in_channels" not in neck_over:
        neck_over["in_channels"] = channels
    cfg["neck"] = _merge(cfg["neck"], neck_over)
    head_path = arch["head"]
    overrides = model.get("head", {})
    for head in _nodes(cfg, head_path):      # Cascade R-CNN: one bbox head per stage
        head.update(_merge(head, overrides))
        head["num_classes"] = num_classes
    for other in arch.get("class_heads") or ():          # a mask head classifies too
        if other != head_path:
            for head in _nodes(cfg, other):
                head["num_classes"] = num_classes
    overridden = {f"{head_path}.{k}" for k in overrides}
    for key in arch["follows_neck"]:
        if key not in overridden:
            *parent, last = key.split(".")
            for node in _nodes(cfg, ".".join(parent)):
                node[last] = cfg["neck"]["out_channels"]
    return _merge(cfg, model.get("model", {}))


def _nodes(cfg: dict[str, Any], dotted: str) -> list[dict[str, Any]]:
    """The dict(s) at a dotted path; a list along the way fans out to each element."""
    nodes: list[Any] = [cfg]
    for part in dotted.split(".") if dotted else []:
        nodes = [n[part] for n in nodes]
        nodes = [x for n in nodes for x in (n if isinstance(n, list) else [n])]
    return nodes


def build_detector(cfg: dict[str, Any]) -> Any:
    """Build an mmdet detector from a model config, in the mmdet registry scope."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import ConfigDict
    from mmengine.registry import DefaultScope

    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope("mmdet"):
        # ConfigDict all the way down: heads read train_cfg / test_cfg by attribute
        return MODELS.build(ConfigDict(copy.deepcopy(cfg)))


def tapped_info(model: dict[str, Any], cfg: dict[str, Any], all_levels: bool = False) -> Any:
    """:class:`methods._base.ModelInfo` of the feature levels a feature distiller taps
    (every neck output with ``all_levels``, for distillers that declare it)."""
    from methods._base import ModelInfo

    arch = catalog.arch_of(model)
    levels = list(arch.get("neck_levels", arch["levels"]) if all_levels else arch["levels"])
    head = cfg["rpn_head"] if arch["stages"] == 2 else cfg["bbox_head"]
    layout = {"type": head["type"], "num_classes": head.get("num_classes", 1),
              "priors": head.get("anchor_generator") or {"strides": head.get("strides")}}
    return ModelInfo(arch=arch.name, family=arch["family"], channels=[cfg["neck"]["out_channels"]] * len(levels),
                     strides=levels, head_layout=layout, task="det",
                     num_classes=int(_nodes(cfg, arch["head"])[0]["num_classes"]))
