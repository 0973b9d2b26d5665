"""Every registered method, on every task it serves, computes the same on two
data-parallel workers as on one: the same loss at every step, the same epoch values seen
by the distiller, the same per-epoch steps (GKP's prototypes) — through ``run_trial`` and
mmengine's Runner, which wraps the model in its DistributedDataParallel on two workers.

Two gloo processes with 2 images each against one process with 4 (the same global
batch: mmengine's samplers shard one permutation). To compare at float tolerance, every
training image of the data is the same image with the same annotations and the random
augmentations are off: a detector normalises its losses per worker and BatchNorm takes
per-worker statistics (as on N GPUs with mmdet's own tools), and each worker draws its
own flips; with identical images neither can differ, so what is left to differ is what
the harness does with two workers. Grows with the registry (``tests/throwaway.py``'s
methods included)."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from harness import catalog
from harness.suite.load import load_suite

from .conftest import TINY_SUITE
from .test_cls import CLS_SUITE
from .test_extending import _write_teacher
from .test_seg import SEG_SUITE

#: (method, task) for every registered method and every task it serves
CASES = [(m.name, task) for m in catalog.METHODS for task in m["tasks"]]
#: what a method needs on the tiny data (64 px boxes are small). GID's relation: per image
#: here; its default, ``batch``, is (as released: the reproduction's relation spans the 2
#: images of one GPU) a statistic of each worker's own batch, so n workers' cannot equal
#: one worker's over their global batch, whatever the harness does
TINY_PARAMS = {"gkp": "{pgm_min_box: 0.0}", "gid": "{min_size: 2.0, relation: image}"}


def _suite_text(task: str, methods: list[str], root: Path, output: Path, batch: int) -> str:
    """The task's tiny suite with ``methods``: 4 training images, 2 epochs, a global batch of 4."""
    listed = "methods:\n" + "".join(f"  {m}: {{params: {TINY_PARAMS.get(m, '{}')}}}\n" for m in methods)
    if task == "det":
        text = TINY_SUITE.format(root=root, output=output).replace("train_images: 8", "train_images: 4")
        text = text.replace("methods: [none, fgd]\n", listed)
    elif task == "seg":
        text = SEG_SUITE.format(root=root, output=output).replace("methods: [pixel_kd, icsd]\n", listed)
    else:       # one labelled image per class (4), 4 unlabeled (SSLD's); at 64 px, since at 32 px
        # MobileNetV3's last BatchNorm sees 1x1 maps, whose variance over identical images is
        # zero up to rounding (a degenerate gradient that differs with the batch's size)
        text = CLS_SUITE.format(root=root, output=output).replace(
            "train_images: 6, val_images: 3, image_size: 32, unlabeled_images: 8",
            "train_images: 1, val_images: 1, image_size: 64, unlabeled_images: 4").replace(
            "img_scale: [32, 32]", "img_scale: [64, 64]")
        text = re.sub(r"methods:\n(  .*\n)+", listed, text)
    text = re.sub(r"schedule: \{epochs: 1, val_interval: 1, batch_size: \d+",
                  f"schedule: {{epochs: 2, val_interval: 2, batch_size: {batch}", text)
    assert f"epochs: 2, val_interval: 2, batch_size: {batch}" in text and listed in text
    return text


def _one_image_everywhere(ds: dict) -> None:
    """Make every training image of the dataset (unlabeled ones included) a copy of the
    first, with the first one's annotations."""
    root = Path(ds["root"])
    if ds["format"] == "coco":
        ann_file = root / "annotations" / "instances_train2017.json"
        doc = json.loads(ann_file.read_text())
        first = doc["images"][0]
        anns = [a for a in doc["annotations"] if a["image_id"] == first["id"]]
        assert anns
        doc["annotations"] = []
        for img in doc["images"]:
            if img is not first:
                shutil.copyfile(root / "train2017" / first["file_name"], root / "train2017" / img["file_name"])
            img.update(width=first["width"], height=first["height"])
            doc["annotations"] += [dict(a, id=len(doc["annotations"]) + i + 1, image_id=img["id"])
                                   for i, a in enumerate(anns)]
        ann_file.write_text(json.dumps(doc))
    elif ds["format"] == "cityscapes":
        images = sorted((root / "leftImg8bit" / "train").rglob("*_leftImg8bit.png"))
        stem = lambda p: p.name[: -len("_leftImg8bit.png")]        # noqa: E731
        labels = {p.name[len(stem(images[0])):]: p
                  for p in (root / "gtFine" / "train").rglob(f"{stem(images[0])}_*")}
        assert labels
        for img in images[1:]:
            shutil.copyfile(images[0], img)
            for suffix, label in labels.items():
                shutil.copyfile(label, root / "gtFine" / "train" / img.parent.name / f"{stem(img)}{suffix}")
    else:
        files = sorted((root / "train").rglob("*.jpg")) + sorted((root / "unlabeled").rglob("*.jpg"))
        for f in files[1:]:
            shutil.copyfile(files[0], f)


def _no_randomness() -> None:
    """Flips, random rescales, crops and photometric distortion off in the detection,
    segmentation and classification training pipelines, and dropout off (DeepLabV3+'s
    decode head, MobileNetV3's classifier): each worker would draw its own."""
    from torchvision.transforms import v2

    from harness.data import folders, formats
    det, seg, folder_init = formats.det_pipeline, formats.seg_pipeline, folders.ImageFolder.__init__

    def det_pipeline(train, img_scale, with_mask=False):
        return [dict(s, prob=0.0) if s["type"] == "RandomFlip" else s for s in det(train, img_scale, with_mask)]

    def seg_pipeline(train, img_scale, crop):
        steps = []
        for s in seg(train, img_scale, crop):
            if s["type"] == "RandomResize":
                steps.append(dict(type="Resize", scale=s["scale"], keep_ratio=True))
            elif s["type"] == "RandomFlip":
                steps.append(dict(s, prob=0.0))
            elif s["type"] not in ("RandomCrop", "PhotoMetricDistortion"):
                steps.append(s)
        return steps

    def image_folder(self, root, split, classes, size, train, *args, **kwargs):
        folder_init(self, root, split, classes, size, train, *args, **kwargs)
        if train:
            self.transform = v2.Resize((size, size), antialias=True)
    formats.det_pipeline, formats.seg_pipeline = det_pipeline, seg_pipeline
    folders.ImageFolder.__init__ = image_folder
    for dropout in (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
                    torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout):
        dropout.forward = lambda self, x: x


def _worker(rank: int, world: int, init_file: str, specs: list[dict], out_dir: str) -> None:
    """One worker (of ``world``): every trial of ``specs`` through run_trial, recording the
    epoch values each distiller call sees and every per-epoch step (with a fingerprint of
    what it produced: GKP's prototypes)."""
    from datetime import timedelta

    import torch.distributed as dist

    from harness.run.trial import release_runner_state, run_trial
    from harness.suite.spec import TrialSpec
    from harness.tasks.det.wrapper import DistillationModel
    from methods._base import Distiller

    _no_randomness()
    if world > 1:       # as Ray Train's workers have it (mmengine reads the local rank)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=300))
    seen: dict[str, dict] = {}
    current: dict = {}

    def on_distiller_call(module, args):
        if isinstance(module, Distiller) and current:
            current["epochs"].append([module.epoch, module.max_epochs])
    handle = torch.nn.modules.module.register_module_forward_pre_hook(on_distiller_call)
    prepare = DistillationModel.prepare_epoch

    def prepare_epoch(self, loader):
        images = []

        def counted():
            for data in loader:
                images.append(len(data["inputs"]))
                yield data
        prepare(self, counted())
        protos = getattr(self.distiller, "prototypes", None)
        current["per_epoch"].append({"epoch": self.distiller.epoch, "images": sum(images),
                                     "prototypes": None if protos is None else [len(c) for _, _, c in protos],
                                     "sums": None if protos is None else [float(s.double().sum()) for s, _, _ in protos]})
    DistillationModel.prepare_epoch = prepare_epoch
    try:
        for raw in specs:
            spec = TrialSpec.from_dict(raw)
            current.update(epochs=[], per_epoch=[])
            try:
                run_trial(spec, log_level="WARNING", resume=False)
                error = ""
            except Exception as exc:         # recorded; the other trials still run
                error = f"{type(exc).__name__}: {exc}"
            finally:
                release_runner_state(spec.trial_id)
            seen[f"{spec.method}/{spec.task}"] = dict(current, error=error)
            current.clear()
    finally:
        handle.remove()
        Path(out_dir, f"{world}-{rank}.json").write_text(json.dumps(seen))
        if world > 1:
            dist.destroy_process_group()
    if world > 1:
        os._exit(0)        # torch's teardown after a gloo group sometimes aborts (see test_cluster)


def _losses(spec) -> list[float]:
    return json.loads((spec.trial_dir / "progress.json").read_text())["losses"]


@pytest.mark.timeout(1200)
def test_every_method_computes_the_same_on_two_workers_as_on_one(tmp_path):
    import torch.multiprocessing as mp

    runs: dict[int, list] = {}
    for world, batch in ((1, 4), (2, 2)):
        specs = []
        for task in ("det", "seg", "cls"):
            methods = [m for m, t in CASES if t == task]
            path = tmp_path / f"{task}-{world}.yaml"
            path.write_text(_suite_text(task, methods, tmp_path / "data" / task, tmp_path / f"out-{world}" / task,
                                        batch))
            suite = load_suite(path)
            specs += [t for t in suite.trials if t.role == "student"]
        runs[world] = specs
    assert {(t.method, t.task) for t in runs[1]} == set(CASES)
    from harness.data.formats import ensure_dataset
    for spec in runs[1]:
        if not Path(spec.dataset["root"]).exists():
            ensure_dataset(spec.dataset)
            _one_image_everywhere(spec.dataset)
    for spec in runs[1] + runs[2]:
        if spec.teacher is not None and not Path(spec.teacher_checkpoint).exists():
            _write_teacher(spec)          # the same seeded weights for both runs' teachers
    for world, specs in runs.items():
        mp.spawn(_worker, args=(world, str(tmp_path / f"group-{world}"), [s.to_dict() for s in specs],
                                str(tmp_path)), nprocs=world, join=True)
    one = json.loads((tmp_path / "1-0.json").read_text())
    two = [json.loads((tmp_path / f"2-{r}.json").read_text()) for r in (0, 1)]
    problems = []
    for a, b in zip(runs[1], runs[2]):
        key = f"{a.method}/{a.task}"
        assert key == f"{b.method}/{b.task}"
        errors = [r[key]["error"] for r in (one, *two) if r[key]["error"]]
        if errors:
            problems.append(f"{key}: {errors[0]}")
            continue
        la, lb = _losses(a), _losses(b)
        if len(la) != len(lb) or la != pytest.approx(lb, rel=1e-4, abs=1e-6):
            problems.append(f"{key}: per-step losses differ: one worker {la}, two {lb}")
        distilled = a.method_name != "none"
        if distilled and not one[key]["epochs"]:
            problems.append(f"{key}: the distiller was never called")
        if distilled and sorted({e for e, _ in one[key]["epochs"]}) != [0, 1]:
            problems.append(f"{key}: one worker's distiller saw epochs {one[key]['epochs']}")
        for rank, r in enumerate(two):
            if r[key]["epochs"] != one[key]["epochs"]:
                problems.append(f"{key}: epochs seen on worker {rank} of two {r[key]['epochs']} != one worker's "
                                f"{one[key]['epochs']}")
            # the per-epoch steps: at the same epochs, over the same number of images, with as
            # many prototypes per level; before any update (epoch 0) the features are the same
            # and so are the prototypes. (Later, features equal to float tolerance may pick
            # other prototypes among near ties: every instance here has duplicates.)
            steps = [{k: v for k, v in p.items() if k != "sums"} for p in r[key]["per_epoch"]]
            if steps != [{k: v for k, v in p.items() if k != "sums"} for p in one[key]["per_epoch"]]:
                problems.append(f"{key}: per-epoch steps on worker {rank} of two {steps} != one worker's "
                                f"{one[key]['per_epoch']}")
            elif steps and r[key]["per_epoch"][0]["sums"] is not None and \
                    r[key]["per_epoch"][0]["sums"] != pytest.approx(one[key]["per_epoch"][0]["sums"], rel=1e-5):
                problems.append(f"{key}: epoch 0's prototypes on worker {rank} of two differ from one worker's")
    gkp = [f"gkp/{t}" for m, t in CASES if m == "gkp"]
    assert all(len(one[k]["per_epoch"]) == 2 for k in gkp), {k: one[k]["per_epoch"] for k in gkp}
    assert not problems, "\n".join(problems)


def test_trials_whose_earlier_computation_was_wrong_have_new_ids(write_suite):
    """A distilled trial on several workers or an iteration-based schedule got a new id
    with the fix (its distiller saw epoch 0 of 1 before): rows stored by the earlier
    harness are neither pooled with nor taken for new ones. Other trials keep theirs."""
    from dataclasses import replace
    suite = load_suite(write_suite())
    fgd = next(t for t in suite.trials if t.method == "fgd")
    alone = next(t for t in suite.trials if t.method == "none")
    assert "distiller_epochs" not in fgd.identity() and "distiller_epochs" not in alone.identity()
    for changed in (replace(fgd, resources={**fgd.resources, "workers": 2}),
                    replace(fgd, schedule={**fgd.schedule, "iters": 100})):
        assert changed.identity()["distiller_epochs"] == 2
    assert "distiller_epochs" not in replace(alone, schedule={**alone.schedule, "iters": 100}).identity()
