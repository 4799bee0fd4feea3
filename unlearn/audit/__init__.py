"""Audit: the metric catalogue (`catalogue`), the feasibility rule (`verdict`) and the definition of "best" (`best`),
marker detection, OOD measures, membership inference and GA guarantee bookkeeping, computed by `evaluate.Auditor`.

Import from the submodules: the package imports nothing, so `unlearn.config` can read the catalogue without
pulling in the Auditor."""
