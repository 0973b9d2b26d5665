"""Running suites: the only floor that knows about Ray.

Owns the Ray session and the driver's bookkeeping shared by runs and searches
(:mod:`.session`), a suite's trial matrix on one Tune run (:mod:`.matrix`), the
hyperparameter search (:mod:`.search`), data-parallel trials on Ray Train workers
(:mod:`.workers`), one trial through mmengine's Runner (:mod:`.trial`, its hooks in
:mod:`.hooks`, its rows in :mod:`.rows`), weight files (:mod:`.weights`), training states,
their storage copies and the trial's logs (:mod:`.states`), the exported configs
(:mod:`.export`), the checks before any trial (:mod:`.preflight`, mmcv's devices in
:mod:`.devices`), the live progress view (:mod:`.progress`) and the run lock
(:mod:`.runlock`). May import every floor below it (store, suite, data, tasks) and
``methods``; only ``harness.cli`` imports it.
"""
