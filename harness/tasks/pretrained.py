"""Which pretrained backbone a model starts from.

mmdet's and mmseg's configs start every backbone from ImageNet weights
(``torchvision://resnet50``, ``open-mmlab://resnet101_v1c``, ...), and every detection and
segmentation distillation paper trains its students and teachers that way. A suite model
entry (or the whole suite) says:

- ``pretrained: true`` (the default): the bundled config's checkpoint. When the suite
  changes the backbone's depth or ResNeXt cardinality the checkpoint follows it
  (``torchvision://resnet50`` -> ``torchvision://resnet101``,
  ``open-mmlab://resnext101_64x4d``, ``open-mmlab://detectron/resnet101_caffe``); a change
  no published checkpoint fits (other widths, say) is an error asking for ``false`` or a
  file, never a silent partial load;
- ``pretrained: false``: train from scratch (the synthetic suites do); ResNet stages and
  BN statistics are then trained too, unless the suite sets ``frozen_stages`` /
  ``norm_eval`` itself;
- ``pretrained: <path or URI>``: that checkpoint (clusters without internet keep a local
  copy). Local paths are checked when the suite is loaded.

Loading itself is mmengine's (``init_cfg=dict(type='Pretrained', ...)`` resolved by
``Runner.train()`` through ``init_weights()``), so URIs are fetched or read from the torch
hub cache exactly as mmdet and mmseg do. This module imports no backend.
"""
from __future__ import annotations

import re
from typing import Any

# backbone keys that change training, not the weights' shapes
_HARMLESS = {"init_cfg", "pretrained", "frozen_stages", "norm_eval", "norm_cfg", "with_cp", "zero_init_residual",
             "strides", "dilations", "out_indices", "contract_dilation", "multi_grid", "style"}
# keys whose change no published checkpoint follows (the weights' shapes would differ)
_WIDTH_KEYS = ("base_channels", "stem_channels", "widen_factor", "deep_stem", "in_channels", "arch",
               "num_stages")


def backbone_checkpoint(name: str, setting: Any, bundled_ckpt: str | None, bundled: dict[str, Any],
                        merged: dict[str, Any]) -> str | None:
    """The checkpoint the backbone of model ``name`` starts from, or None (from scratch).

    setting: the model's ``pretrained`` (True, False, or a path / URI); bundled_ckpt: the
    checkpoint named by the bundled config; bundled / merged: the backbone config before
    and after the suite's overrides.
    """
    if setting is False or setting is None:
        return None
    if isinstance(setting, str):
        return setting
    if not bundled_ckpt:
        return None                              # the bundled config starts from scratch itself
    changed = {k for k in set(bundled) | set(merged)
               if k not in _HARMLESS and bundled.get(k) != merged.get(k)}
    if not changed:
        return bundled_ckpt
    hint = (f"set 'pretrained: false' on model '{name}' (or for the whole suite) to train it from scratch, "
            f"or 'pretrained: <file or URI>' for weights that fit")
    widths = sorted(changed & set(_WIDTH_KEYS))
    if widths:
        raise ValueError(f"model '{name}': the bundled pretrained backbone '{bundled_ckpt}' does not fit "
                         f"this backbone ({', '.join(f'{k}={merged.get(k)!r}' for k in widths)}); {hint}")
    kind, depth = merged.get("type"), merged.get("depth")
    if kind == "ResNeXt":
        return f"open-mmlab://resnext{depth}_{merged.get('groups', 32)}x{merged.get('base_width', 4)}d"
    if re.search(r"resnet\d+", bundled_ckpt) and changed <= {"depth", "type", "groups", "base_width"} \
            and kind == bundled.get("type"):
        return re.sub(r"resnet\d+", f"resnet{depth}", bundled_ckpt)
    raise ValueError(f"model '{name}': cannot tell which pretrained backbone fits after changing "
                     f"{', '.join(sorted(changed))} (the bundled config's is '{bundled_ckpt}'); {hint}")
