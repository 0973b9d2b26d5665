"""Data: dataset formats (:mod:`.formats`: COCO, VOC, Cityscapes, VOC 2012, image
folders), their loaders' configs and fingerprints, image-folder datasets
(:mod:`.folders`), the synthetic generators that write each real layout
(:mod:`.synth`), metrics the libraries lack (:mod:`.metrics`) and the checks of the
data before any trial (:mod:`.checks`, per layout :mod:`.check_det`, :mod:`.check_seg`,
:mod:`.check_folders`). May import
``harness.registry``, ``harness.catalog``, ``harness.store`` and ``harness.suite``;
never the task engines or the runner.
"""
