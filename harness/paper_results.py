"""The seed papers' headline results, with the setups they were measured in: data only,
registered into ``catalog.PAPER_RESULTS``. The report sets a cell beside the entry whose
setup it matches (``harness.store.papers``).

Each entry holds:
- ``method``: the method's registry name, and ``params``: the values of its parameters the
  result needs (the rest are free), e.g. ICSD's adaptive loss weighting;
- ``dataset_format`` and ``metric``; the values are on the display scale (mAP x 100);
- ``teacher`` and ``student``: a model as a suite names it (an OpenMMLab config, or an
  architecture with its overrides: ``backbone``, ``neck``, ``head``, ``model``); a string
  is a model without overrides. ``teacher: None`` when the source does not name it;
- ``epochs``: the student's schedule, None when the source does not give it;
- ``baseline`` (the student alone), ``distilled``, ``teacher_value`` (None if not printed);
- ``source``: where the numbers are printed; ``setup_note``: how the source's setup differs
  from the closest one the harness can build, shown beside every comparison (empty when
  the setup is the source's own).
"""
from __future__ import annotations

from typing import Any

RESULTS: list[dict[str, Any]] = []


def _add(key: str, **entry: Any) -> None:
    entry.setdefault("params", {})
    entry.setdefault("teacher_value", None)
    entry.setdefault("setup_note", "")
    RESULTS.append({"key": key, **entry})


# ---------------------------------------------------------------------------------- FGD
# yzd-v/FGD README: students on their mmdet 2x configs (GFL 1x), distilled for 24 epochs
# (GFL 12) from the released teachers; the mmdet 3.x names of the same configs.
_FGD = "FGD (Yang et al., CVPR 2022): yzd-v/FGD README, table 'Results' (COCO val2017 box mAP)"
for _key, _teacher, _student, _epochs, _base, _kd in (
        ("retinanet-r50", "retinanet/retinanet_x101-64x4d_fpn_1x_coco.py", "retinanet/retinanet_r50_fpn_2x_coco.py",
         24, 37.4, 40.7),
        ("retinanet-r101", "retinanet/retinanet_x101-64x4d_fpn_1x_coco.py", "retinanet/retinanet_r101_fpn_2x_coco.py",
         24, 38.9, 41.7),
        ("faster-rcnn-r50", "dcn/cascade-mask-rcnn_x101-32x4d-dconv-c3-c5_fpn_1x_coco.py",
         "faster_rcnn/faster-rcnn_r50_fpn_2x_coco.py", 24, 38.4, 42.0),
        ("faster-rcnn-r101", "dcn/cascade-mask-rcnn_x101-32x4d-dconv-c3-c5_fpn_1x_coco.py",
         "faster_rcnn/faster-rcnn_r101_fpn_2x_coco.py", 24, 39.8, 44.1),
        ("mask-rcnn-r50", "dcn/cascade-mask-rcnn_x101-32x4d-dconv-c3-c5_fpn_1x_coco.py",
         "mask_rcnn/mask-rcnn_r50_fpn_2x_coco.py", 24, 39.2, 42.1),
        ("reppoints-r50", "reppoints/reppoints-moment_x101-dconv-c3-c5_fpn-gn_head-gn_2x_coco.py",
         "reppoints/reppoints-moment_r50_fpn-gn_head-gn_2x_coco.py", 24, 38.6, 42.0),
        ("reppoints-r101", "reppoints/reppoints-moment_x101-dconv-c3-c5_fpn-gn_head-gn_2x_coco.py",
         "reppoints/reppoints-moment_r101_fpn-gn_head-gn_2x_coco.py", 24, 40.5, 43.8),
        ("fcos-r50", "fcos/fcos_r101-caffe_fpn_gn-head-1x_coco.py",
         "fcos/fcos_r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x_coco.py", 24, 38.5, 42.7),
        ("gfl-r50", "gfl/gfl_r101_fpn_ms-2x_coco.py", "gfl/gfl_r50_fpn_1x_coco.py", 12, 40.2, 43.5)):
    _add(f"fgd/{_key}", method="fgd", dataset_format="coco", metric="bbox_mAP", teacher=f"mmdet::{_teacher}",
         student=f"mmdet::{_student}", epochs=_epochs, baseline=_base, distilled=_kd, source=_FGD)

# ---------------------------------------------------------------------------------- GKP
# hikvision-research/DAVAR-Lab-ML, ECCV22_Distilling_Object_Detectors_with_Global_Knowledge:
# the ReadMe's comparison tables; the released KD config (faster_rcnn_coco_kd_config.py:
# 24 epochs, pair_wise 'use_pgm', i.e. no global loss) holds "the hyper-parameters used
# for experiments in the paper", and starts the student from its trained 2x checkpoint.
_GKP = ("global knowledge (Tang et al., ECCV 2022): hikvision-research/DAVAR-Lab-ML "
        "ECCV22_Distilling_Object_Detectors_with_Global_Knowledge/ReadMe.md, section 5 (COCO box mAP)")
_GKP_INIT = ("the released config starts the student from its trained 2x checkpoint (the zoo's student alone), "
             "so give the student `pretrained:` that checkpoint to train as it did")
_add("gkp/faster-rcnn-r50", method="gkp", params={"global_loss": "off"}, dataset_format="coco", metric="bbox_mAP",
     teacher="mmdet::faster_rcnn/faster-rcnn_r101_fpn_2x_coco.py",
     student="mmdet::faster_rcnn/faster-rcnn_r50_fpn_2x_coco.py", epochs=24, baseline=38.4, distilled=40.6,
     teacher_value=39.8, source=_GKP, setup_note=_GKP_INIT)
_add("gkp/retinanet-r50", method="gkp", params={"global_loss": "off"}, dataset_format="coco", metric="bbox_mAP",
     teacher="mmdet::retinanet/retinanet_r101_fpn_2x_coco.py", student="mmdet::retinanet/retinanet_r50_fpn_2x_coco.py",
     epochs=24, baseline=37.4, distilled=39.8, teacher_value=38.9, source=_GKP,
     setup_note="only the Faster R-CNN KD config is released; the RetinaNet run's settings are assumed the same. "
                + _GKP_INIT)

# ---------------------------------------------------------------------------------- GID
# The paper's abstract (arXiv 2103.02340) gives the RetinaNet pair only; its tables were
# trained in MEGVII's internal framework, which no OpenMMLab config reproduces.
_add("gid/retinanet-r50", method="gid", dataset_format="coco", metric="bbox_mAP",
     teacher="mmdet::retinanet/retinanet_r101_fpn_2x_coco.py", student="mmdet::retinanet/retinanet_r50_fpn_2x_coco.py",
     epochs=None, baseline=36.2, distilled=39.1, teacher_value=38.1,
     source="GID (Dai et al., CVPR 2021): the paper's abstract, arXiv 2103.02340 (COCO box mAP)",
     setup_note="the paper trained in MEGVII's internal framework (student alone 36.2, teacher 38.1; mmdet's 2x "
                "configs reach 37.4 and 38.9), so these are the nearest mmdet configs: compare gains, not values")

# ------------------------------------------------------------------------------- AICSD
# AmirMansurian/AICSD README (the paper's tables): DeepLabV3+ at output stride 16,
# ResNet-101 teacher, ResNet-18 and MobileNetV2 students, mIoU on the val sets. "KD" is
# the pixel-wise KD the released code runs alone; AICSD is ICSD with adaptive weighting.
_AICSD = "AICSD (Mansourian et al., 2023): AmirMansurian/AICSD README, 'Performance on {}' (mIoU %)"
_AICSD_EPOCHS = ("the README gives no schedule: train_kd.py defaults to {} epochs on {} while its adaptive-weighting "
                 "line assumes 120; backbones start from ImageNet weights")
_OS16 = {"strides": [1, 2, 2, 1], "dilations": [1, 1, 1, 2]}
_ASPP = {"dilations": [1, 6, 12, 18]}
_DLV3P_R101 = {"arch": "deeplabv3plus", "backbone": {"depth": 101, **_OS16}, "head": _ASPP}
_DLV3P_R18 = {"arch": "deeplabv3plus_r18", "backbone": _OS16, "head": _ASPP}
_DLV3P_MNV2 = {"arch": "deeplabv3plus_mnv2", "head": _ASPP}
for _fmt, _table, _default_epochs, _teacher_value, _rows in (
        ("voc_seg", "PascalVOC2012", 50, 77.85, (("r18", _DLV3P_R18, 67.50, 69.13, 70.03),
                                                   ("mnv2", _DLV3P_MNV2, 63.92, 66.39, 68.05))),
        ("cityscapes", "CityScapes", 200, 77.66, (("r18", _DLV3P_R18, 64.09, 65.21, 68.46),
                                                  ("mnv2", _DLV3P_MNV2, 63.05, 64.03, 66.53)))):
    for _name, _student, _base, _kd, _aicsd in _rows:
        _common = dict(dataset_format=_fmt, metric="mIoU", teacher=_DLV3P_R101, student=_student, epochs=None,
                       baseline=_base, teacher_value=_teacher_value, source=_AICSD.format(_table),
                       setup_note=_AICSD_EPOCHS.format(_default_epochs, _table))
        _add(f"icsd/{_fmt}-{_name}", method="icsd", params={"variant": "released", "alw": True}, distilled=_aicsd,
             **_common)
        _add(f"pixel_kd/{_fmt}-{_name}", method="pixel_kd", params={"variant": "released"}, distilled=_kd, **_common)

# -------------------------------------------------------------------------------- SSLD
# PaddlePaddle/PaddleClas docs/zh_CN/training/advanced/ssld.md, section 2: top-1 trained
# alone and with SSLD (its teacher, ~4M images mined from ImageNet-22k, then a fine-tune
# on ImageNet-1k). The tables name no teacher or schedule (the MobileNetV3 study beside
# them: a ResNet50_vd teacher at 82.4%, 360 epochs).
_SSLD = "SSLD (PaddleClas): PaddlePaddle/PaddleClas docs/zh_CN/training/advanced/ssld.md, section 2 (ImageNet top-1 %)"
_SSLD_DATA = ("PaddleClas' models and training recipe, with ~4M unlabeled ImageNet-22k images mined by the teacher "
              "and a fine-tune on ImageNet-1k")
for _key, _arch, _base, _kd, _note in (
        ("mobilenetv3-large", "mobilenet_v3_large", 75.3, 79.0,
         "MobileNetV3_large_x1_0 is torchvision's mobilenet_v3_large"),
        ("mobilenetv2", "mobilenet_v2", 72.2, 76.74, "MobileNetV2 is torchvision's mobilenet_v2"),
        ("resnet34-vd", "resnet34", 76.0, 79.7, "ResNet34_vd's stem and downsampling differ from torchvision's "
                                                "resnet34 (no -vd variant): the nearest architecture"),
        ("resnet50-vd", "resnet50", 79.1, 83.0, "ResNet50_vd's stem and downsampling differ from torchvision's "
                                                "resnet50 (no -vd variant): the nearest architecture")):
    _add(f"ssld/{_key}", method="ssld", dataset_format="imagenet", metric="top1", teacher=None, student=_arch,
         epochs=None, baseline=_base, distilled=_kd, source=_SSLD, setup_note=f"{_note}; {_SSLD_DATA}")
