"""kd-harness: benchmark knowledge-distillation methods for vision across suites of
(teacher, student, dataset) combinations, scheduled by Ray Tune, with Parquet results.

Importing this package is cheap: nothing here imports torch, mmdet or ray. The heavy
modules (``harness.trial``, ``harness.tune``, ``harness.wrapper``) import them when used.
"""

__version__ = "0.1.0"
