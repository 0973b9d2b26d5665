"""The task engines: what a trial of each task trains and evaluates.

One module or subpackage per task, each named by ``catalog.TASKS``: detection
(:mod:`.det`: mmdet detectors, the distillation model, dense-head outputs), segmentation
(:mod:`.seg`: mmseg segmentors) and classification (:mod:`.cls`: torchvision
classifiers); each gives ``prepare_trial(spec, load_weights)``. Shared by all: the
student + frozen teacher + distiller model (:mod:`.teacher_student`), pretrained
backbones (:mod:`.pretrained`) and OpenMMLab config helpers (:mod:`.configs`). Builds
the batches of ``methods._base`` and hands them to the distillers. May import ``methods``
and every floor below it (data, suite, store, catalog); never ``harness.run``.
"""
