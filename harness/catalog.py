"""Everything the harness knows by name: methods, model architectures, dataset formats
and metrics. Pure data plus lazy targets, so ``harness ls`` and ``harness plan`` run
without importing torch, mmdet or ray.

A method's hyperparameters and the paper's defaults are declared here, once; the
method's class receives the resolved values. Per-family defaults (FGD uses different
weights for one-stage, two-stage, FCOS and RepPoints detectors) are keyed by the
``family`` of the student architecture.
"""
from __future__ import annotations

from typing import Any

from harness import paper_results
from harness.registry import Entry, Registry

METHODS = Registry("method")
ARCHS = Registry("architecture")
DATASET_FORMATS = Registry("dataset format")
METRICS = Registry("metric")
TASKS = Registry("task")
PAPER_RESULTS = Registry("paper result")

# ------------------------------------------------------------------------------ tasks
# A task is one engine module (``engine``) giving three functions:
# - ``prepare_trial(spec, load_weights)`` (the target) -> the model (teacher loaded), its
#   config for the export, train / val loaders, the evaluator and, optionally, a
#   second-stage loader (``finetune_loader``): what the trial runner asks of a task;
# - ``build_model(model, num_classes, schedule)`` -> (network, its config): a suite
#   model entry built, which preflight does for every model before Ray starts;
# - ``model_info(model, network, config, num_classes, all_levels)`` -> the ModelInfo a
#   distiller is built with (methods/_base.py).
# ``scope``: the mmengine registry scope its configs name types in. A new task is one
# module and one entry here (docs/extending.md).
TASKS.register("det", target="harness.tasks.det.task:prepare_trial", engine="harness.tasks.det.task",
               scope="mmdet", doc="object detection: mmdet 3.x detectors, COCO / VOC layouts")
TASKS.register("seg", target="harness.tasks.seg:prepare_trial", engine="harness.tasks.seg", scope="mmseg",
               doc="semantic segmentation: mmseg 1.x segmentors, Cityscapes / VOC 2012 layouts")
TASKS.register("cls", target="harness.tasks.cls:prepare_trial", engine="harness.tasks.cls", scope=None,
               doc="image classification: torchvision classifiers, image-folder layouts")


def task_engine(task: str, function: str) -> Any:
    """One of a task's engine functions (``prepare_trial``, ``build_model``,
    ``model_info``), imported on first use."""
    from .registry import import_target
    return import_target(f"{TASKS.get(task)['engine']}:{function}")

# ---------------------------------------------------------------------------- metrics
METRICS.register(
    "coco_bbox", task="det", primary="bbox_mAP", higher_is_better=True,
    keys=("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l"),
    # CocoMetric returns nothing when the model made no detection at all: AP is then 0
    empty_value=0.0, display_scale=100.0,
    doc="COCO box AP through mmdet's CocoMetric (pycocotools), in [0, 1]",
)
METRICS.register(
    "voc_bbox", task="det", primary="voc07_mAP", higher_is_better=True,
    keys=("voc07_mAP", "voc_area_mAP"),
    # evaluator key -> stored name (two VOCMetric instances, told apart by their prefix)
    rename={"voc07/mAP": "voc07_mAP", "voc_area/mAP": "voc_area_mAP"},
    empty_value=0.0, display_scale=100.0,
    doc="VOC box mAP at IoU 0.5 through mmdet's VOCMetric: VOC07 11-point and area, in [0, 1]",
)

METRICS.register(
    "topk", task="cls", primary="top1", higher_is_better=True, keys=("top1", "top5"), display_scale=100.0,
    doc="top-1 and top-5 accuracy, in [0, 1]",
)

METRICS.register(
    "seg_iou", task="seg", primary="mIoU", higher_is_better=True, keys=("mIoU", "mAcc", "aAcc"),
    value_scale=0.01, display_scale=100.0,   # mmseg reports percentages; stored in [0, 1]
    doc="mIoU, mAcc and aAcc through mmseg's IoUMetric, in [0, 1]",
)

# -------------------------------------------------------------------- dataset formats
DATASET_FORMATS.register(
    "coco", target="harness.data.formats:CocoFormat", task="det", metric="coco_bbox",
    synth="harness.data.synth:write_coco", check="harness.data.check_det:check_coco",
    synth_params=("train_images", "val_images", "image_size", "max_objects", "seed"),
    doc="COCO layout: <root>/{train2017,val2017}/*.jpg, <root>/annotations/instances_{train,val}2017.json",
)
DATASET_FORMATS.register(
    "voc", target="harness.data.formats:VocFormat", task="det", metric="voc_bbox",
    synth="harness.data.synth:write_voc", check="harness.data.check_det:check_voc",
    synth_params=("train_images", "val_images", "image_size", "max_objects", "seed"),
    doc="Pascal VOC layout (root = VOCdevkit): VOC{2007,2012}/{JPEGImages,Annotations,ImageSets/Main}",
)

DATASET_FORMATS.register(
    "imagenet", target="harness.data.formats:ImageNetFormat", task="cls", metric="topk",
    synth="harness.data.synth:write_imagenet", check="harness.data.check_folders:check_image_folders",
    synth_params=("train_images", "val_images", "image_size", "unlabeled_images", "seed"),
    doc="ImageNet-style folders: <root>/{train,val}/<class>/*.jpg; unlabeled images in <root>/<unlabeled>/",
)

DATASET_FORMATS.register(
    "cityscapes", target="harness.data.formats:CityscapesFormat", task="seg", metric="seg_iou",
    synth="harness.data.synth:write_cityscapes", check="harness.data.check_seg:check_cityscapes",
    synth_params=("train_images", "val_images", "image_size", "seed"),
    doc="Cityscapes: leftImg8bit/{train,val}/<city>/*_leftImg8bit.png, gtFine/.../*_gtFine_labelTrainIds.png",
)
DATASET_FORMATS.register(
    "voc_seg", target="harness.data.formats:VocSegFormat", task="seg", metric="seg_iou",
    synth="harness.data.synth:write_voc_seg", check="harness.data.check_seg:check_voc_seg",
    synth_params=("train_images", "val_images", "image_size", "aug_images", "seed"),
    doc="Pascal VOC 2012 segmentation (root = VOC2012); aug: true adds SegmentationClassAug",
)

# ----------------------------------------------------------------------- architectures
# `levels`: strides of the FPN outputs a feature distiller taps, in order.
# `family`: selects a method's per-family defaults.
# `head`: dotted path of the head that the suite's `head:` overrides go to and that
# holds num_classes; `follows_neck`: dotted keys set to the neck's out_channels;
# `head_types`: the dense head (or RPN), then a two-stage detector's RoI and bbox heads,
# as its config builds them (what head-based distillers check). A model entry may name
# any other bundled config instead (`config:`): harness.suite.zoo describes it the same way.
ARCHS.register(
    "retinanet", task="det", family="one_stage", stages=1,
    config="mmdet::retinanet/retinanet_r50_fpn_1x_coco.py",
    levels=(8, 16, 32, 64, 128), head="bbox_head", follows_neck=("bbox_head.in_channels",),
    head_types=("RetinaHead",),
    doc="RetinaNet with ResNet backbone and FPN (P3-P7)",
)
ARCHS.register(
    "fcos", task="det", family="fcos", stages=1,
    config="mmdet::fcos/fcos_r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x_coco.py",
    levels=(8, 16, 32, 64, 128), head="bbox_head", follows_neck=("bbox_head.in_channels",),
    head_types=("FCOSHead",),
    doc="FCOS (center sampling, normalised boxes, centerness on regression, GIoU) with FPN (P3-P7)",
)
ARCHS.register(
    "faster_rcnn", task="det", family="two_stage", stages=2,
    config="mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py",
    # FPN gives P2-P6; feature distillers tap P2-P5 as the FGD and GID configs do (the
    # global-knowledge strategy taps all five: `neck_levels`)
    levels=(4, 8, 16, 32), neck_levels=(4, 8, 16, 32, 64), head="roi_head.bbox_head",
    follows_neck=("rpn_head.in_channels", "roi_head.bbox_roi_extractor.out_channels",
                  "roi_head.bbox_head.in_channels"),
    head_types=("RPNHead", "StandardRoIHead", "Shared2FCBBoxHead"),
    doc="Faster R-CNN with FPN (P2-P6; distillers tap P2-P5)",
)
ARCHS.register(
    "cascade_rcnn", task="det", family="two_stage", stages=2,
    config="mmdet::cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py",
    levels=(4, 8, 16, 32), neck_levels=(4, 8, 16, 32, 64), head="roi_head.bbox_head",
    follows_neck=("rpn_head.in_channels", "roi_head.bbox_roi_extractor.out_channels",
                  "roi_head.bbox_head.in_channels"),
    head_types=("RPNHead", "CascadeRoIHead", "Shared2FCBBoxHead"),
    doc="Cascade R-CNN with FPN (three bbox heads; a teacher for feature distillers)",
)

for _name, _doc in (("resnet18", "ResNet-18"), ("resnet34", "ResNet-34"), ("resnet50", "ResNet-50"),
                   ("mobilenet_v2", "MobileNetV2"), ("mobilenet_v3_small", "MobileNetV3-Small"),
                   ("mobilenet_v3_large", "MobileNetV3-Large")):
    ARCHS.register(_name, task="cls", family="cls", torchvision=_name, levels=(),
                   doc=f"torchvision {_doc} classifier (from scratch; `model:` gives builder kwargs)")

# DeepLabV3+ from mmseg's configs (output stride 8 as configured; suites set 16)
ARCHS.register("deeplabv3plus", task="seg", family="seg", levels=(),
               config="mmseg::deeplabv3plus/deeplabv3plus_r50-d8_4xb2-40k_cityscapes-512x1024.py",
               doc="DeepLabV3+ with a ResNet-V1c backbone (depth from `backbone: {depth: 101}`)")
ARCHS.register("deeplabv3plus_r18", task="seg", family="seg", levels=(),
               config="mmseg::deeplabv3plus/deeplabv3plus_r18-d8_4xb2-80k_cityscapes-512x1024.py",
               doc="DeepLabV3+ ResNet-18-V1c, with mmseg's head widths for it")
ARCHS.register("deeplabv3plus_mnv2", task="seg", family="seg", levels=(),
               config="mmseg::mobilenet_v2/mobilenet-v2-d8_deeplabv3plus_4xb2-80k_cityscapes-512x1024.py",
               doc="DeepLabV3+ with a MobileNetV2 backbone")

# ----------------------------------------------------------------------------- methods
METHODS.register(
    "none", target=None, tasks=("det", "seg", "cls"), params={},
    doc="the student trained alone with the same schedule and seed: the reference for every gain",
)

_FGD_DEFAULTS: dict[str, dict[str, float]] = {
    # (T, alpha, beta, gamma, lambda) from the FGD paper / released configs.
    "one_stage": {"temp": 0.5, "alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lambda": 5e-6},
    "two_stage": {"temp": 0.5, "alpha": 5e-5, "beta": 2.5e-5, "gamma": 5e-5, "lambda": 5e-7},
    "reppoints": {"temp": 0.5, "alpha": 1.6e-3, "beta": 8e-4, "gamma": 8e-4, "lambda": 8e-6},
    "fcos": {"temp": 0.8, "alpha": 1.6e-3, "beta": 8e-4, "gamma": 8e-4, "lambda": 8e-6},
}
METHODS.register(
    "fgd", target="methods.fgd:FGD", tasks=("det",),
    # inherit: start the student's neck and head from the teacher's (same shapes needed);
    # on in every released config whose pair allows it (`init_student = True`), off only
    # for the Cascade teacher, whose heads differ: such a pair sets inherit: false
    params={**_FGD_DEFAULTS["one_stage"], "inherit": True},
    family_params=_FGD_DEFAULTS, positive=("temp",),
    needs_same_levels=True,
    doc="Focal and Global Distillation (Yang et al., CVPR 2022)",
)


METHODS.register(
    "cwd", target="methods.cwd:CWD", tasks=("det", "seg"),
    # mmrazor's configs: tau 1, loss_weight 10 on each FPN level (cwd_fpn_frcnn_r101_frcnn_r50_1x_coco.py,
    # and the RetinaNet one built on it), 5 on segmentation logits
    # (cwd_logits_pspnet_r101_d8_pspnet_r18_d8_512x1024_cityscapes_80k.py)
    params={"temp": 1.0, "weight": 10.0, "variant": "mmrazor"}, family_params={"seg": {"weight": 5.0}},
    choices={"variant": ("mmrazor", "cirkd", "paddle")}, positive=("temp",),
    needs_same_levels=True, all_levels=True,
    doc="Channel-wise distillation (Shu et al., ICCV 2021): per-channel spatial softmax, T^2 KL; detection: every "
        "FPN level, segmentation: the decode heads' logits; variant mmrazor | cirkd | paddle: each release's "
        "normalisation",
)

METHODS.register(
    "feature_mse", target="methods.feature_mse:FeatureMSE", tasks=("det",), params={"weight": 1.0},
    needs_same_levels=True,
    doc="baseline: MSE feature imitation on every FPN level through 1x1 adapters",
)
METHODS.register(
    "gid", target="methods.gid:GID", tasks=("det",),
    # the author's reproduction, 2x config (the suites' schedule): feature weight 5e-4
    # (5e-3 is its 1x default), regression smooth-L1 beta 0.1, boxes' sides > 10 px
    params={"score": "paper", "top_n": 3000, "min_size": 10.0, "nms_iou": 0.3, "k": 10, "roi_size": 10,
            "w_feat": 5e-4, "w_rel": 40.0, "w_cls": 0.1, "w_reg": 1.0, "reg_beta": 0.1, "relation": "batch"},
    choices={"score": ("paper", "max_logit"), "relation": ("batch", "image")},
    positive=("top_n", "k", "roi_size", "reg_beta"), at_most_one=("nms_iou",),
    needs_same_levels=True, needs_same_head=True,
    # the response loss reads (class logits, box regressions) per prior of this dense head:
    # one-stage bbox_head, or a two-stage detector's RPN (GFL's distributions and
    # RepPoints' point sets are other regressions)
    dense_heads=("RetinaHead", "FCOSHead", "ATSSHead", "RPNHead"),
    doc="General Instance Distillation (Dai et al., CVPR 2021)",
)

METHODS.register(
    "gkp", target="methods.gkp:GKP", tasks=("det",),
    # the released config (faster_rcnn_coco_kd_config.py): kd_param [[1, 0], [1], [4, 1]]
    # (local x1, background x4, soft label x1), kd_t 2, pair_wise 'use_pgm' (no global
    # loss), pair_wise_factor 5 (the global loss's weight when it is on)
    params={"prototypes": 10, "pursuit_alpha": 10.0, "pgm_percentile": 40.0, "pgm_min_box": 30.0,
            "pgm_images_per_class": 800, "pgm_max_images": 10000,
            "global_loss": "off", "w_global": 5.0, "w_local": 1.0, "bg_weight": 4.0,
            "w_roi_kd": 1.0, "kd_temp": 2.0},
    choices={"global_loss": ("off", "released", "paper")},
    positive=("prototypes", "kd_temp", "pgm_images_per_class", "pgm_max_images"),
    needs_same_levels=True, all_levels=True,
    # a two-stage student's per-RoI soft-label KD runs on these RoI heads (a mask head is ignored)
    roi_heads=("StandardRoIHead", "CascadeRoIHead"),
    doc="Global knowledge with prototypes, PGM + RDM (Tang et al., ECCV 2022); global_loss: released|paper adds "
        "the global alignment loss (off in the released config)",
)

METHODS.register(
    "pixel_kd", target="methods.icsd:PixelKD", tasks=("seg",),
    params={"weight": 10.0, "temp": 1.0, "variant": "released"}, positive=("temp",),
    choices={"variant": ("released", "paper")},
    doc="baseline: pixel-wise KD, KL(softmax(z_t) || softmax(z_s)); released: mean over B*C*H*W (AICSD's "
        "KLDivLoss), paper: summed over classes, mean over labelled pixels",
)
METHODS.register(
    "icsd", target="methods.icsd:ICSD", tasks=("seg",),
    params={"variant": "released", "w_icsd": 9500.0, "w_kd": 10.0, "temp": 1.0, "alw": True}, positive=("temp",),
    choices={"variant": ("released", "paper")},
    doc="ICSD with adaptive loss weighting (AICSD, Mansourian et al. 2023); variant released (default) = the "
        "released code, paper = the paper's equations",
)
METHODS.register(
    "hinton_kd", target="methods.ssld:HintonKD", tasks=("cls",), params={"temp": 4.0, "weight": 1.0}, positive=("temp",),
    doc="baseline: Hinton KD, CE + weight * T^2 * KL at temperature T (Hinton et al., 2015)",
)
METHODS.register(
    "ssld", target="methods.ssld:SSLD", tasks=("cls",),
    params={"weight": 1.0, "unlabeled": True, "mine_topk": 0, "finetune_epochs": 0, "finetune_lr_factor": 0.01,
            "teacher_mode": "eval"},
    choices={"teacher_mode": ("eval", "train")},
    doc="SSLD: symmetric KL to the teacher, no labels; unlabeled folder, top-k mining, fine-tune stage; "
        "teacher_mode: train runs the teacher on batch statistics as PaddleClas does",
)


# ------------------------------------------------------------------- papers' numbers
# Each seed paper's headline results with the setup they were measured in, and where they
# are printed: data in ``harness/paper_results.py``. The report sets a cell beside the
# entry whose setup it matches (``harness.store.papers``).
for _entry in paper_results.RESULTS:
    PAPER_RESULTS.register(_entry["key"], **{k: v for k, v in _entry.items() if k != "key"})


def arch_of(model: dict[str, Any]) -> Entry:
    """The architecture entry of a suite model: the catalog's (``arch:``), or the one the
    suite derived from the OpenMMLab config the model names (``config:``, carried in the
    model as ``arch_meta`` so that every process reads the same)."""
    meta = model.get("arch_meta")
    if meta:
        return Entry(name=str(meta["name"]), target=None, meta=dict(meta))
    return ARCHS.get(model["arch"])


def method_params(method: str, family: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The method's hyperparameters for a student of ``family``: paper defaults, then
    the per-family defaults, then the suite's overrides (already validated)."""
    entry = METHODS.get(method)
    params = dict(entry["params"])
    params.update(entry.get("family_params", {}).get(family, {}))
    params.update(overrides or {})
    return params


def task_metric(task_or_format: str) -> str:
    """The metric name of a dataset format."""
    return DATASET_FORMATS.get(task_or_format)["metric"]
