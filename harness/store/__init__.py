"""Results: what a run leaves behind and how it is read.

Owns the Parquet results schema and its atomic writes (:mod:`.results`), storage URIs
for teacher weights and training states and the leases beside them (:mod:`.storage`:
local paths, ``file://``, ``s3://``) and the reports built from the store
(:mod:`.report`, Markdown; :mod:`.html_report`, one HTML page; their statistics,
:mod:`.stats`). Imports no torch, mmdet or ray. May import
``harness.registry`` and ``harness.catalog`` only.
"""
