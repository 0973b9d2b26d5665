"""The suite schema: every key a suite may hold, its type, range and meaning, in one place.

pydantic checks the types and ranges of a suite document (after ``extends`` is merged)
and :mod:`.validation` turns its errors into messages that name the file, the line and
the key, with what would be valid. The same models generate the key reference
(``python -m harness schema``, ``docs/suite-schema.md``). What needs the registries
(names of methods, architectures, dataset formats) or cross-references (a pair's
teacher) is checked in :mod:`harness.suite.load`, after this.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError,
                      field_validator, model_validator)

#: names that become directory and file names: letters, digits, ``_ . + -``; no ``..``
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$")
#: the largest seed numpy's and torch's generators accept (numpy: below 2**32)
MAX_SEED = 2**32 - 1
NAME_HELP = "1-100 characters: letters, digits, '_', '.', '+', '-', starting with a letter or digit, no '..'"


def check_name(value: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value) or ".." in value:
        raise ValueError(f"{value!r} is not a valid name ({NAME_HELP})")
    return value


Name = Annotated[str, Field(min_length=1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


# ----------------------------------------------------------------------------- models
class Schedule(Strict):
    """Training schedule. A model's ``schedule`` overrides the suite's key by key."""

    epochs: StrictInt = Field(12, ge=1, le=100_000, description="training epochs (ignored when iters is set)")
    iters: StrictInt | None = Field(None, ge=1, le=100_000_000, description="training iterations instead of epochs")
    val_interval: StrictInt = Field(1, ge=1, description="evaluate every N epochs (or iterations)")
    batch_size: StrictInt = Field(2, ge=1, le=4096, description="images per batch (per worker)")
    lr: float = Field(0.01, allow_inf_nan=False, gt=0, le=100, description="base learning rate")
    momentum: float = Field(0.9, allow_inf_nan=False, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(1e-4, allow_inf_nan=False, ge=0, le=1, description="weight decay")
    grad_clip: float | None = Field(35.0, allow_inf_nan=False, gt=0, description="max gradient norm; null for no clipping")
    warmup_iters: StrictInt = Field(100, ge=0, description="linear warm-up iterations")
    img_scale: list[StrictInt] = Field([1333, 800], min_length=2, max_length=2,
                                       description="[w, h] the images are resized to (keeping the ratio for detection)")
    num_workers: StrictInt = Field(0, ge=0, le=64, description="data loader worker processes")
    pin_memory: bool = Field(False, description="data loader: page-locked host memory (faster copies to a GPU)")
    amp: bool = Field(False, description="mixed precision (mmengine's AmpOptimWrapper); the teacher's forward "
                                         "runs in the same precision")
    amp_dtype: Literal["float16", "bfloat16"] = Field("float16", description="the autocast dtype when amp is on")
    checkpoint_interval: StrictInt | None = Field(
        None, ge=1, description="save the training state every N epochs (or iterations) for resumption; "
                                "default: every epoch, or every val_interval iterations")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="optimizer")
    policy: Literal["step", "cosine", "poly"] = Field(
        "step", description="lr policy: steps at 2/3 and 11/12, cosine to zero, or DeepLab's poly 0.9")
    crop_size: list[StrictInt] | None = Field(None, min_length=2, max_length=2,
                                              description="segmentation: random crop [h, w] after the rescale")

    @field_validator("img_scale", "crop_size")
    @classmethod
    def _sizes(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and not all(8 <= x <= 16384 for x in v):
            raise ValueError(f"sizes must be between 8 and 16384 pixels, got {v}")
        return v


class Resources(Strict):
    """What one trial asks of the cluster."""

    cpu: float = Field(1, allow_inf_nan=False, gt=0, le=4096, description="CPUs per trial, or per worker when "
                                                                          "workers > 1 (fractions allowed)")
    gpu: float = Field(0, allow_inf_nan=False, ge=0, le=64, description="GPUs per trial, or per worker when "
                                                                        "workers > 1 (fractions allowed: 0.5 puts two "
                                                                        "trials on one GPU)")
    workers: StrictInt = Field(1, ge=1, le=4096, description="data-parallel Ray Train workers per trial, each with "
                                                             "cpu and gpu as above and its own batch_size images")


class Synth(Strict):
    """A synthetic twin of the dataset, written at ``root`` on first use (keys allowed per format)."""

    train_images: StrictInt | None = Field(None, ge=1, le=1_000_000, description="training images")
    val_images: StrictInt | None = Field(None, ge=1, le=1_000_000, description="validation images")
    image_size: StrictInt | None = Field(None, ge=16, le=4096, description="image side, pixels")
    max_objects: StrictInt | None = Field(None, ge=1, le=100, description="objects per image (detection)")
    unlabeled_images: StrictInt | None = Field(None, ge=0, le=1_000_000, description="unlabelled images (SSLD)")
    aug_images: StrictInt | None = Field(None, ge=0, le=1_000_000, description="SBD-style extra images (VOC)")
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED, description="generator seed")


class Dataset(Strict):
    """One dataset: a real on-disk layout, or its synthetic twin."""

    format: str = Field(description="dataset format (python -m harness ls)")
    root: str = Field(min_length=1, description="dataset directory; ~ and ${VAR} / ${VAR:-default} expand")
    synth: Synth | None = Field(None, description="write a synthetic dataset at root if it is not there")
    classes: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=1, description="class names to keep (default: all of the format's)")
    unlabeled: str | None = Field(None, min_length=1, description="classification: folder of unlabelled images")
    aug: StrictBool = Field(False, description="VOC: add the SBD-style augmented training set")

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"class names repeat: {sorted({c for c in v if v.count(c) > 1})}")
        return v


class Model(Strict):
    """A student (or the common part of a teacher): an architecture and config overrides."""

    arch: str | None = Field(None, description="registered architecture (python -m harness ls): a short name "
                                                "for a bundled config; give arch or config")
    config: str | None = Field(None, min_length=1, description=(
        "an OpenMMLab config: one bundled with the installed mmdet / mmseg (mmdet::gfl/gfl_r50_fpn_1x_coco.py, "
        "mmseg::pspnet/pspnet_r50-d8_4xb2-80k_cityscapes-512x1024.py) or a YAML / JSON config file (a .py file "
        "from disk only with --allow-python-configs); give arch or config"))
    backbone: dict[str, Any] | None = Field(None, description="overrides merged into the config's backbone")
    neck: dict[str, Any] | None = Field(None, description="overrides merged into the config's neck")
    head: dict[str, Any] | None = Field(None, description="overrides merged into the config's head")
    model: dict[str, Any] | None = Field(None, description="overrides merged into the whole model config")
    schedule: dict[str, Any] | None = Field(None, description="this model's schedule (keys of 'schedule')")
    pretrained: Any = Field(None, description="true (the config's ImageNet backbone), false, or a file / URI")
    resources: Resources | None = Field(None, description="this model's trials' resources (keys of "
                                                               "'resources'; keys left out are the suite's)")

    @field_validator("pretrained")
    @classmethod
    def _pretrained(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, bool) and not (isinstance(v, str) and v):
            raise ValueError("must be true, false, or a checkpoint file or URI")
        return v


class Teacher(Model):
    """A teacher: a model, trained by the harness unless ``checkpoint`` is given."""

    checkpoint: str | None = Field(None, min_length=1, description=(
        "the trained teacher's weights: a local checkpoint file (the harness's export, or what mmdet's / mmseg's "
        "tools/train.py wrote) or a URL (http(s)://, open-mmlab://, torchvision://) downloaded once into "
        "<teacher_cache>/downloads with its sha256 recorded"))


class MethodEntry(Strict):
    """A method under a label: the registered method and its hyperparameter overrides."""

    method: str | None = Field(None, description="registered method (default: the label)")
    params: dict[str, Any] | None = Field(None, description="hyperparameters (python -m harness ls lists them)")
    schedule: dict[str, Any] | None = Field(None, description="schedule keys this method's trials override (a "
                                            "tuned configuration, as harness tune writes it; see Schedule)")


class Pair(Strict):
    """A (teacher, student) pair, optionally restricted to some of the suite's methods."""

    teacher: str = Field(description="a name under 'teachers'")
    student: str = Field(description="a name under 'students'")
    methods: list[str] | None = Field(None, min_length=1, description="labels under 'methods' (default: all)")


class SearchParam(Strict):
    """One dimension of a search space: exactly one of the four forms."""

    choice: list[Any] | None = Field(None, min_length=1, description="one of these values")
    uniform: list[float] | None = Field(None, min_length=2, max_length=2, description="[low, high], uniform")
    loguniform: list[float] | None = Field(None, min_length=2, max_length=2,
                                           description="[low, high], uniform in log space (both > 0)")
    randint: list[StrictInt] | None = Field(None, min_length=2, max_length=2, description="[low, high), an integer")

    @model_validator(mode="after")
    def _one(self) -> "SearchParam":
        given = [k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, uniform, loguniform, randint (got {given or 'none'})")
        bounds = getattr(self, given[0])
        if given[0] != "choice":
            if not bounds[0] < bounds[1]:
                raise ValueError(f"{given[0]}: low must be below high, got {bounds}")
            if given[0] == "loguniform" and bounds[0] <= 0:
                raise ValueError(f"loguniform: bounds must be > 0, got {bounds}")
        return self


class Search(Strict):
    """``harness tune``: a hyperparameter search for one method of the suite, on every
    (dataset, pair) the method serves; teachers are the suite's."""

    method: str | list[str] = Field(description="a label under 'methods' whose hyperparameters are searched, or "
                                    "several (none, the student alone, among them: a tuned baseline), each "
                                    "searched with the same budget, searcher and scheduler")
    space: dict[str, SearchParam] = Field(min_length=1, description="parameter (or schedule.KEY) -> its range; "
                                          "a method's search uses the schedule keys and its own parameters")
    searcher: Literal["optuna", "random"] = Field("optuna", description="Optuna (TPE) through Ray Tune, or random")
    scheduler: Literal["asha", "none"] = Field("asha", description="early stopping on the validation metric")
    grace_period: StrictInt = Field(1, ge=1, description="ASHA: evaluations before a trial can be stopped")
    reduction_factor: StrictInt = Field(2, ge=2, description="ASHA: keep the best 1/N at each rung")
    start_from: list[dict[str, Any]] = Field(
        default_factory=list, description="configurations tried first, in this order (e.g. the released defaults): "
                                          "each maps some or all keys of the space to a value inside its range")
    budget: StrictInt = Field(8, ge=1, le=10_000, description="configurations to try (start_from included)")
    concurrency: StrictInt = Field(1, ge=1, le=1024, description="configurations trained at once")
    seeds: list[Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]] = Field([0], min_length=1, description="seeds each configuration "
                                                                                      "is scored on (mean)")
    final_seeds: list[Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]] = Field(
        [100, 101, 102], min_length=1, description="fresh seeds of the suite written for the best configuration")


class SeedsUntil(Strict):
    """When a cell has seeds enough: a target on the width of its gain's interval only
    (never on whether the interval excludes zero: stopping on significance biases the
    result)."""

    gain_ci_half_width: float = Field(gt=0, le=100, description="stop once the 95% interval of the cell's gain "
                                      "over the student alone is at most this wide on each side, in the "
                                      "leaderboard's units (AP, mIoU or top-1 points)")


class SeedRule(Strict):
    """``seeds:`` as a stopping rule instead of a list: every cell (a method and the
    student alone, paired) starts with seeds 0 .. first-1; the run then adds seeds to each
    cell whose gain's interval is wider than the target, up to ``max``."""

    first: StrictInt = Field(3, ge=2, le=1000, description="seeds each cell starts with (0 .. first-1)")
    max: StrictInt = Field(10, ge=2, le=1000, description="the most seeds a cell gets")
    until: SeedsUntil = Field(description="the target on the interval's width")

    @model_validator(mode="after")
    def _order(self) -> "SeedRule":
        if self.max < self.first:
            raise ValueError(f"max ({self.max}) is below first ({self.first})")
        return self


class Baselines(Strict):
    """Baselines beyond the student alone on the suite's schedule."""

    compute_matched: bool = Field(False, description="also train, for each distilled cell and seed, the student "
                                  "alone on a stretched schedule (same shape, more iterations) whose device-hours "
                                  "match the distilled trial's; the report then gives each gain at equal schedule "
                                  "and at equal compute")
    tolerance: float = Field(0.1, allow_inf_nan=False, gt=0, le=0.5, description="how close the device-hours must "
                             "come (0.1: within 10% of the distilled trial's)")
    attempts: StrictInt = Field(3, ge=1, le=10, description="stretched trials tried per cell and seed to come "
                                "within the tolerance (each attempt's length is fitted to the ones before)")


class SuiteDoc(Strict):
    """A suite: datasets x (teacher, student) pairs x methods x seeds."""

    name: str | None = Field(None, description=f"suite name (default: the file's stem); {NAME_HELP}")
    description: str | None = Field(None, description="free text")
    extends: list[str] | None = Field(None, description="base suites (path or list), relative to this file")
    datasets: dict[str, Dataset] = Field(min_length=1, description="name -> dataset")
    teachers: dict[str, Teacher] = Field(min_length=1, description="name -> teacher model")
    students: dict[str, Model] = Field(min_length=1, description="name -> student model")
    pairs: list[Pair] = Field(min_length=1, description="{teacher, student, methods} or [teacher, student]")
    methods: dict[str, MethodEntry] = Field(
        default_factory=dict, description="list of method names, or label -> {method, params}")
    seeds: list[Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]] | SeedRule = Field(
        [0], description="seeds of the student trials (1 to 1000 of them), or a rule that adds seeds until each "
                         "cell's gain is precise (see SeedRule)")
    schedule: dict[str, Any] | None = Field(None, description="the schedule every trial shares (see Schedule)")
    resources: Resources = Field(default_factory=Resources, description="per-trial resources")
    output: str | None = Field(None, min_length=1, description="results directory (default results/<name>); "
                                                              "must stay under the working directory or an allowed root")
    teacher_cache: str | None = Field(None, min_length=1, description="where harness-trained teachers are kept "
                                                                     "(default <output>/../_teachers)")
    storage: str | None = Field(None, min_length=1, description="the run's storage for teacher checkpoints and "
                                "resumable training states, so that no shared filesystem is needed: a local "
                                "directory or a URI pyarrow's filesystems accept (s3://bucket/prefix, gs://..., "
                                "hdfs://..., file:///...; pyarrow's options may follow as a query, e.g. "
                                "?endpoint_override=host:9000&scheme=http; credentials come from the "
                                "environment, never the URI); default: the node-local teacher_cache and output")
    teacher_seed: StrictInt = Field(0, ge=0, le=MAX_SEED, description="seed of harness-trained teachers")
    max_failures: StrictInt = Field(0, ge=0, le=100, description="retries of a trial whose worker or node died "
                                                                 "(not of one that raised or diverged); it resumes "
                                                                 "from its last checkpoint")
    pretrained: Any = Field(True, description="default for every model: true, false, or a file / URI")
    search: Search | None = Field(None, description="hyperparameter search run by `harness tune` (see Search)")
    baselines: Baselines = Field(default_factory=Baselines, description="compute-matched baselines (see Baselines)")
    tuned: dict[str, str] | None = Field(None, description="method labels (none: the student alone) whose "
                                         "configuration a search chose -> the search's id, as harness tune "
                                         "writes it; the report marks each comparison tuned-vs-tuned or "
                                         "against an untuned baseline")

    _pretrained = field_validator("pretrained")(Model._pretrained.__func__)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return v if v is None else check_name(v)

    @field_validator("datasets", "teachers", "students", "methods")
    @classmethod
    def _names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            check_name(key)
        return v

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_rule(cls, v: Any) -> Any:
        """A mapping is a rule: checked as one, so an error names the rule's key."""
        if isinstance(v, dict):
            try:
                return SeedRule.model_validate(v)
            except ValidationError as exc:
                said = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"the rule {{first, max, until: {{gain_ci_half_width}}}} (it stops on the gain's "
                                 f"interval width only, never on significance): {said}") from None
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: Any) -> Any:
        if isinstance(v, SeedRule):
            return v
        if not 1 <= len(v) <= 1000:
            raise ValueError(f"{len(v)} seeds; give 1 to 1000 (or a rule: {{first, max, until}})")
        if len(set(v)) != len(v):
            raise ValueError(f"seeds repeat: {sorted({s for s in v if v.count(s) > 1})} (each seed once)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        """The shorthand forms: ``extends: path``, ``methods: [a, b]``, ``pairs: [[t, s]]``."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("extends"), str):
            data["extends"] = [data["extends"]]
        methods = data.get("methods")
        if isinstance(methods, list):
            if not all(isinstance(m, str) for m in methods):
                raise ValueError(f"methods: a list of method names holds only names, got {methods!r}")
            data["methods"] = {m: {} for m in methods}
        elif isinstance(methods, dict):
            data["methods"] = {k: ({} if v is None else v) for k, v in methods.items()}
        elif methods is None:
            data.pop("methods", None)
        pairs = data.get("pairs")
        if isinstance(pairs, list):
            data["pairs"] = [{"teacher": p[0], "student": p[1]} if isinstance(p, list) and len(p) == 2 else p
                             for p in pairs]
        return data


# ---------------------------------------------------------------------- documentation


def int_bounds(model: type[BaseModel], key: str) -> tuple[int | None, int | None]:
    """(ge, le) of an integer field of a schema model: what the command line checks the
    same value against (``data synth --train-images``, as a suite's ``synth:``)."""
    import annotated_types
    meta = model.model_fields[key].metadata
    return (next((m.ge for m in meta if isinstance(m, annotated_types.Ge)), None),
            next((m.le for m in meta if isinstance(m, annotated_types.Le)), None))
