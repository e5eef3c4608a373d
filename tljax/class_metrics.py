"""Per-class results from a confusion matrix: what one accuracy number hides on imbalanced data.

Conventions follow scikit-learn: rows are true classes, columns predictions; a precision, recall
or F1 with a zero denominator is 0; balanced accuracy averages the recall of the classes present
among the true labels; macro-F1 averages F1 over the classes present among the true labels or
the predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  return np.divide(numerator, denominator, out=np.zeros(len(numerator)),
                   where=denominator > 0)


def summarize(confusion: np.ndarray, class_names: Sequence[str] | None = None
              ) -> tuple[dict[str, float], dict[str, Any]]:
  """(scalars: balanced_accuracy and macro_f1; details: per_class {name: precision, recall,
  f1, support} and the confusion matrix as nested lists)."""
  confusion = np.asarray(confusion, np.int64)
  names = list(class_names) if class_names else [str(i) for i in range(len(confusion))]
  correct = np.diag(confusion).astype(np.float64)
  support, predicted = confusion.sum(1), confusion.sum(0)
  recall, precision = _ratio(correct, support), _ratio(correct, predicted)
  f1 = _ratio(2 * precision * recall, precision + recall)
  present = support > 0
  seen = present | (predicted > 0)
  scalars = dict(
      balanced_accuracy=float(recall[present].mean()) if present.any() else 0.0,
      macro_f1=float(f1[seen].mean()) if seen.any() else 0.0)
  per_class = {name: dict(precision=float(p), recall=float(r), f1=float(f), support=int(n))
               for name, p, r, f, n in zip(names, precision, recall, f1, support, strict=True)}
  return scalars, dict(per_class=per_class, confusion=confusion.tolist())
