"""kd-harness: benchmark knowledge-distillation methods for vision across suites of
(teacher, student, dataset) combinations, scheduled by Ray Tune, with Parquet results.

The house, floor by floor (each subpackage's docstring says what it owns). A module may
import from its own floor and from the floors below it, never from one above:

==========  ====================================================================
``cli``     the command line (top floor: may import everything)
``run``     Ray Tune runs and searches, Ray Train workers, the trial runner,
            training states and logs, preflight, progress, the run lock
``suite``   the suite language: schema, loading, YAML, the trial spec
``tasks``   one engine per task (``det/``, ``seg``, ``cls``), the shared
            teacher/student model, pretrained backbones
``data``    dataset formats, synthetic generators, metrics
``store``   the results schema, storage URIs, reports (Markdown, HTML)
``catalog`` everything known by name (pure data), over ``registry``
==========  ====================================================================

``methods`` (the distillers, beside this package) imports nothing of ``harness``; the
task engines and the runner import it. ``tests/test_layout.py`` reads :data:`FLOORS` and
checks every import of ``harness`` and ``methods`` against it, and that none is a cycle.

Importing this package is cheap: nothing here imports torch, mmdet or ray. The heavy
modules (``harness.run.trial``, ``harness.run.matrix``, ``harness.tasks``) import them
when used.
"""

__version__ = "0.1.0"

#: the floors, lowest first: a module imports only from its own floor or one listed before it
FLOORS = ("harness", "harness.registry", "harness.catalog", "harness.store", "harness.suite", "harness.data",
          "harness.tasks", "harness.run", "harness.cli", "harness.__main__")
