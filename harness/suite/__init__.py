"""The suite language: what a suite file may say and what it means.

Owns the schema (:mod:`.schema`, pydantic models of every key; their reference,
:mod:`.reference`), YAML reading with positions and bounds (:mod:`.yamlio`), loading and
cross-checking a suite into its trial matrix (:mod:`.load`, :mod:`.paths`,
:mod:`.methods`), models named by an OpenMMLab config (:mod:`.zoo`) and the trial spec
every other floor receives (:mod:`.spec`). Pure data: imports no torch, mmdet or ray, so ``plan`` and ``ls`` stay
fast (reading a zoo config imports mmengine's ``Config`` only). May import ``harness.registry``, ``harness.catalog`` and ``harness.store`` (storage
URIs); never the task engines, the data formats or the runner.
"""
