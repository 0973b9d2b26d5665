"""Distillers, one file each. Each file holds pure loss functions (tensors in, a dict of
named loss parts out, testable without any model) and one :class:`methods._base.Distiller`
subclass that owns the method's trainable parts (adapters, ...). Names, tasks and the
papers' default hyperparameters are registered in :mod:`harness.catalog`."""
