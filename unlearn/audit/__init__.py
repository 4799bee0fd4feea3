"""Audit: the metric catalogue, marker detection, OOD measures and GA guarantee bookkeeping."""

from unlearn.audit.catalogue import GLOBAL, PER_SPLIT, REFERENCES, describe
from unlearn.audit.evaluate import Auditor, model_outputs
from unlearn.audit.guarantees import ga_guarantees

__all__ = ["GLOBAL", "PER_SPLIT", "REFERENCES", "Auditor", "describe", "ga_guarantees", "model_outputs"]
