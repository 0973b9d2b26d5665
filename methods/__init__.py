"""Distillers, one file each. Each file holds pure loss functions (tensors in, a dict of
named loss parts out, testable without any model) and one :class:`methods._base.Distiller`
subclass that owns the method's trainable parts (adapters, ...). ``methods/_base.py`` is
the contract every task keeps with them: the batches each task hands a distiller and
every hook it may call, each with its default. Names, tasks and the papers' default
hyperparameters are registered in :mod:`harness.catalog`; nothing here imports the
harness (``docs/extending.md``)."""
