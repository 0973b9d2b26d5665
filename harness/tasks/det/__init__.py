"""Detection: mmdet 3.x detectors built from the catalog's bundled configs
(:mod:`.models`), the distillation model the Runner trains (:mod:`.wrapper`), the dense
heads' per-prior outputs distillers read (:mod:`.dense`) and the trial's build
(:mod:`.task`)."""
