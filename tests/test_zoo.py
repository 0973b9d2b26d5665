"""OpenMMLab's zoo by name: model entries name any config bundled with mmdet / mmseg
(``config: mmdet::gfl/...``), a YAML / JSON config from disk, or (with the CLI's flag
only) a ``.py`` one; the shipped paper-table suites' every architecture builds; one
training iteration of each new family (GFL, RepPoints, Mask R-CNN, Cascade Mask R-CNN
as FGD's teacher, PSPNet, DeepLabV3) runs with FGD or ICSD through the Runner, at tiny
widths set by the suites' own override keys; distillers that read heads refuse, when
the suite loads, a head type they do not support."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from harness import catalog
from harness.suite.load import load_suite
from harness.suite.yamlio import SuiteError

REPO = Path(__file__).resolve().parents[1]
TABLE_SUITES = ["fgd_coco.yaml", "gid_coco.yaml", "gkp_coco.yaml", "cityscapes.yaml", "voc_seg.yaml"]

# tiny widths through the ordinary override keys (backbone / neck / head / model)
R18 = "backbone: {depth: 18, base_channels: 8}, neck: {out_channels: 16}"
GN = "norm_cfg: {type: GN, num_groups: 4, requires_grad: true}"
RCNN = "head: {fc_out_channels: 16}, model: {rpn_head: {feat_channels: 16}, roi_head: {mask_head: {conv_out_channels: 16}}}"
ZOO_SUITE = """
name: zoo
pretrained: false
datasets:
  shapes: {{format: coco, root: {root}/shapes, synth: {{train_images: 4, val_images: 2, image_size: 64, max_objects: 2, seed: 1}}}}
  cs: {{format: cityscapes, root: {root}/cs, synth: {{train_images: 4, val_images: 2, image_size: 32, seed: 0}}}}
teachers:
  gfl-t: {{config: "mmdet::gfl/gfl_r50_fpn_1x_coco.py", {r18}, head: {{feat_channels: 16, stacked_convs: 1, {gn}}}}}
  rep-t: {{config: "mmdet::reppoints/reppoints-moment_r50_fpn-gn_head-gn_2x_coco.py",
          backbone: {{depth: 18, base_channels: 8}}, neck: {{out_channels: 16, {gn}}},
          head: {{feat_channels: 16, point_feat_channels: 16, stacked_convs: 1, {gn}}}}}
  cmask-t: {{config: "mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py", {r18}, {rcnn}}}
  psp-t: {{config: "mmseg::pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py", backbone: {{base_channels: 16}},
          head: {{in_channels: 128, channels: 32}}, model: {{auxiliary_head: {{in_channels: 64, channels: 16}}}}}}
students:
  gfl-s: {{config: "mmdet::gfl/gfl_r50_fpn_1x_coco.py", {r18}, head: {{feat_channels: 16, stacked_convs: 1, {gn}}}}}
  rep-s: {{config: "mmdet::reppoints/reppoints-moment_r50_fpn-gn_head-gn_2x_coco.py",
          backbone: {{depth: 18, base_channels: 8}}, neck: {{out_channels: 16, {gn}}},
          head: {{feat_channels: 16, point_feat_channels: 16, stacked_convs: 1, {gn}}}}}
  mask-s: {{config: "mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py", {r18}, {rcnn}}}
  dlv3-s: {{config: "mmseg::deeplabv3/deeplabv3_r18-d8_4xb2-80k_cityscapes-512x1024.py", backbone: {{base_channels: 8}},
           head: {{in_channels: 64, channels: 16}}, model: {{auxiliary_head: {{in_channels: 32, channels: 16}}}}}}
  psp-s: {{config: "mmseg::pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py", backbone: {{base_channels: 8}},
          head: {{in_channels: 64, channels: 16}}, model: {{auxiliary_head: {{in_channels: 32, channels: 16}}}}}}
pairs:
  - {{teacher: gfl-t, student: gfl-s, methods: [fgd]}}
  - {{teacher: rep-t, student: rep-s, methods: [fgd]}}
  - {{teacher: cmask-t, student: mask-s, methods: [fgd-cascade]}}
  - {{teacher: psp-t, student: dlv3-s, methods: [icsd]}}
  - {{teacher: psp-t, student: psp-s, methods: [icsd]}}
methods:
  fgd: {{}}
  fgd-cascade: {{method: fgd, params: {{inherit: false}}}}
  icsd: {{}}
seeds: [0]
schedule: {{iters: 1, val_interval: 1, batch_size: 2, lr: 0.01, warmup_iters: 0, img_scale: [64, 64], crop_size: [32, 32]}}
resources: {{cpu: 1, gpu: 0}}
output: {root}/results
"""


@pytest.fixture(scope="module")
def zoo_suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    path = root / "zoo.yaml"
    path.write_text(ZOO_SUITE.format(root=root, r18=R18, gn=GN, rcnn=RCNN))
    return load_suite(path)


def test_a_config_names_its_architecture_and_its_family(zoo_suite):
    by_name = {t.model["name"]: t for t in zoo_suite.trials}
    arch = {name: catalog.arch_of(t.model) for name, t in by_name.items()}
    assert {n: a["family"] for n, a in arch.items() if a["task"] == "det"} == {
        "gfl-t": "one_stage", "gfl-s": "one_stage", "rep-t": "reppoints", "rep-s": "reppoints",
        "cmask-t": "two_stage", "mask-s": "two_stage"}
    assert list(arch["mask-s"]["levels"]) == [4, 8, 16, 32] and list(arch["gfl-s"]["levels"]) == [8, 16, 32, 64, 128]
    assert arch["dlv3-s"]["task"] == "seg" and by_name["dlv3-s"].task == "seg"
    fgd = {t.model["name"]: t.params for t in zoo_suite.trials if t.method_name == "fgd"}
    assert fgd["rep-s"]["alpha"] == 1.6e-3 and fgd["mask-s"]["alpha"] == 5e-5     # the families' released weights


def test_one_iteration_of_every_new_family_through_the_runner(zoo_suite):
    from harness.run.preflight import preflight
    from harness.run.trial import run_trial

    preflight(zoo_suite)
    done = []
    for spec in zoo_suite.trials:             # teachers come first in the matrix
        if spec.method in ("teacher", "fgd", "fgd-cascade", "icsd"):
            result = run_trial(spec, log_level="WARNING")
            primary = catalog.METRICS.get(catalog.task_metric(spec.dataset["format"]))["primary"]
            assert primary in result.metrics and result.epoch == 1, spec.name
            done.append(spec.name)
    assert len(done) == 4 + 5                 # four teachers, five distilled students


def _table_suite(name, tmp_path, monkeypatch):
    """A shipped paper-table suite, loaded with stand-in data roots and checkpoints."""
    for var in ("COCO_ROOT", "CITYSCAPES_ROOT", "IMAGENET_ROOT"):
        monkeypatch.setenv(var, str(tmp_path))
    monkeypatch.setenv("VOC_ROOT", str(tmp_path))
    (tmp_path / "VOC2012").mkdir(exist_ok=True)
    monkeypatch.setenv("KD_CHECKPOINTS", str(tmp_path))
    texts = [(REPO / "suites" / name).read_text()] + [p.read_text() for p in (REPO / "suites" / "base").glob("*.yaml")]
    for text in texts:
        for ckpt in re.findall(r"\$\{KD_CHECKPOINTS[^}]*\}/([\w.\-+]+)", text):
            (tmp_path / ckpt).touch()
    monkeypatch.chdir(REPO)
    return load_suite(REPO / "suites" / name)


@pytest.mark.parametrize("name", TABLE_SUITES)
def test_the_paper_table_suites_plan_and_every_architecture_builds(name, tmp_path, monkeypatch):
    """Each paper-table suite plans (with stand-in data and checkpoints) and every model it
    names builds as its config says, at full size."""
    suite = _table_suite(name, tmp_path, monkeypatch)
    models = {json.dumps(m, sort_keys=True, default=str): (m, t) for t in suite.trials
              for m in [t.model] + ([t.teacher] if t.teacher else [])}
    for model, trial in models.values():
        classes = {"det": 80, "seg": 19}[trial.task]          # COCO's, Cityscapes' (the stand-ins hold no data)
        net, cfg = catalog.task_engine(trial.task, "build_model")(model, classes, trial.schedule)
        assert sum(p.numel() for p in net.parameters()) > 1e6, model["name"]
        del net


def _one_model_suite(write_suite, tmp_path, entry: str, methods: str = "[none]"):
    text = write_suite().read_text()
    text = re.sub(r"students:\n  s:\n(    .*\n)+", f"students:\n  s:\n{entry}", text)
    return write_suite(text.replace("methods: [none, fgd]", f"methods: {methods}"))


def test_a_yaml_config_from_disk_is_a_model(write_suite, tmp_path):
    from harness.suite import zoo
    model = zoo.model_config("mmdet::retinanet/retinanet_r50_fpn_1x_coco.py")
    (tmp_path / "mine.json").write_text(json.dumps({"model": model}))
    path = _one_model_suite(write_suite, tmp_path, f"    config: {tmp_path / 'mine.json'}\n"
                                                   "    backbone: {depth: 18, base_channels: 8}\n"
                                                   "    neck: {out_channels: 16}\n")
    student = next(t for t in load_suite(path).trials if t.role == "student")
    assert student.model["config"] == str(tmp_path / "mine.json")
    assert catalog.arch_of(student.model)["family"] == "one_stage"


def test_a_python_config_from_disk_needs_the_flag(write_suite, tmp_path, monkeypatch):
    from harness.cli import main
    from harness.suite.zoo import ALLOW_PYTHON_ENV
    (tmp_path / "mine.py").write_text("_base_ = []\nmodel = dict(type='RetinaNet')\n")
    path = _one_model_suite(write_suite, tmp_path, f"    config: {tmp_path / 'mine.py'}\n")
    monkeypatch.delenv(ALLOW_PYTHON_ENV, raising=False)
    with pytest.raises(SuiteError, match=r"students\.s\.config: a \.py config from disk runs code.*--allow-python-configs"):
        load_suite(path)
    (tmp_path / "ran").unlink(missing_ok=True)
    (tmp_path / "mine.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\nmodel = dict(type='X')\n")
    with pytest.raises(SuiteError):
        load_suite(path)
    assert not (tmp_path / "ran").exists(), "the refused config ran"
    monkeypatch.setenv(ALLOW_PYTHON_ENV, "1")      # what --allow-python-configs sets
    with pytest.raises(SuiteError, match="cannot be read as an mmdet / mmseg model config"):
        load_suite(path)                           # read now (and it ran), but it is no detector
    assert (tmp_path / "ran").exists()
    monkeypatch.delenv(ALLOW_PYTHON_ENV)
    assert main(["plan", str(path), "--allow-python-configs"]) == 2     # the flag reaches the loader


@pytest.mark.parametrize("entry,message", [
    ("    arch: retinanet\n    config: mmdet::retinanet/retinanet_r50_fpn_1x_coco.py\n", "give arch or config, not both"),
    ("    config: mmdet::retinanet/nothere.py\n", r"no file .*nothere\.py in the installed mmdet"),
    ("    config: mmpose::x.py\n", "the scope 'mmpose::' is not one of mmdet::, mmseg::"),
    ("    backbone: {depth: 18}\n", "or name an OpenMMLab config with 'config:'"),
])
def test_bad_config_references_are_suite_errors(write_suite, tmp_path, entry, message):
    with pytest.raises(SuiteError, match=message):
        load_suite(_one_model_suite(write_suite, tmp_path, entry))


def test_a_head_based_distiller_refuses_a_head_it_cannot_read(write_suite, tmp_path):
    """GID reads the dense head's per-prior predictions: a GFL pair is refused when the
    suite loads, naming the head type and what is supported."""
    text = write_suite().read_text()
    gfl = ('    config: mmdet::gfl/gfl_r50_fpn_1x_coco.py\n    backbone: {depth: 18, base_channels: 8}\n'
           '    neck: {out_channels: 16}\n')
    text = re.sub(r"teachers:\n  t:\n(    .*\n)+", f"teachers:\n  t:\n{gfl}", text)
    text = re.sub(r"students:\n  s:\n(    .*\n)+", f"students:\n  s:\n{gfl}", text)
    with pytest.raises(SuiteError, match=r"GFLHead is not one it reads; supported: RetinaHead, FCOSHead"):
        load_suite(write_suite(text.replace("methods: [none, fgd]", "methods: [gid]")))


@pytest.mark.parametrize("arch", [a.name for a in catalog.ARCHS if a.get("config")])
def test_the_catalogs_short_names_agree_with_their_bundled_configs(arch):
    """What the catalog records of each architecture (task, family, levels, head types) is
    what describing its bundled config gives: a short name is that config."""
    from harness.suite import zoo
    entry = catalog.ARCHS.get(arch)
    described = zoo.describe(entry["config"])
    assert described["task"] == entry["task"] and described["family"] == entry["family"]
    if entry["task"] == "det":
        assert tuple(described["levels"]) == tuple(entry["levels"])
        assert tuple(described["head_types"])[:len(entry["head_types"])] == tuple(entry["head_types"])
        assert described["head"] == entry["head"] and set(entry["follows_neck"]) <= set(described["follows_neck"])


PAPER_CELLS = {
    "fgd_coco.yaml": {f"fgd/{k}" for k in ("retinanet-r50", "retinanet-r101", "faster-rcnn-r50", "faster-rcnn-r101",
                                          "mask-rcnn-r50", "reppoints-r50", "reppoints-r101", "fcos-r50", "gfl-r50")},
    "gid_coco.yaml": {"gid/retinanet-r50"},
    "gkp_coco.yaml": {"gkp/faster-rcnn-r50", "gkp/retinanet-r50"},
    "voc_seg.yaml": {"icsd/voc_seg-r18", "icsd/voc_seg-mnv2", "pixel_kd/voc_seg-r18", "pixel_kd/voc_seg-mnv2"},
    "cityscapes.yaml": {"icsd/cityscapes-r18", "icsd/cityscapes-mnv2", "pixel_kd/cityscapes-r18",
                        "pixel_kd/cityscapes-mnv2"},
    "imagenet.yaml": {"ssld/mobilenetv3-large", "ssld/mobilenetv2", "ssld/resnet34-vd"},
}


@pytest.mark.parametrize("name", sorted(PAPER_CELLS))
def test_each_paper_table_suite_trains_the_setups_of_its_papers_results(name, tmp_path, monkeypatch):
    """The cells of each shipped paper-table suite are matched, exactly, to the catalog's
    results of its paper (so its report sets the paper's number beside ours); its other
    methods and variants (the paper variant of ICSD, GKP's global loss) match none."""
    from harness.store.papers import match, model_setup
    suite = _table_suite(name, tmp_path, monkeypatch)
    matched = set()
    for t in suite.student_trials():
        if t.method == "none":
            continue
        setup = {"method": t.method_name, "params": t.params, "format": t.dataset["format"],
                 "synthetic": bool(t.dataset.get("synth")), "teacher": model_setup(t.teacher),
                 "student": model_setup(t.model), "epochs": t.schedule.get("epochs")}
        entry, diff = match(setup)
        if entry is not None and not diff:
            matched.add(entry.name)
            assert not t.method.endswith("-paper"), (t.method, entry.name)     # the papers' variants differ
    assert matched == PAPER_CELLS[name]
