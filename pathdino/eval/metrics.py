"""Classification metrics without scikit-learn: balanced accuracy, macro-F1, ROC AUC, confusion matrix.

Conventions (they match scikit-learn's defaults, so numbers are comparable with published tables):

- ``confusion_matrix[i, j]`` counts samples of true class ``i`` predicted as ``j``.
- Balanced accuracy is the mean recall over the classes that occur in ``y_true``.
- Macro-F1 averages per-class F1 over the classes that occur in ``y_true`` or ``y_pred``; a class with
  ``tp + fp == 0`` or ``tp + fn == 0`` contributes precision/recall 0 (so its F1 is 0).
- ROC AUC is the Mann-Whitney statistic (ties count one half). Binary: ``scores`` is the positive-class score
  ``[N]`` or a ``[N, 2]`` matrix. Multi-class: one-vs-rest AUC per class, macro-averaged over the classes that
  have both positives and negatives. Undefined AUC (one class only) is ``nan``.
"""

from __future__ import annotations

import math

import numpy as np


def _as_int_labels(y: object, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D class indices, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} holds a negative class index ({int(arr.min())}); unlabelled items cannot be scored")
    return arr.astype(np.int64)


def confusion_matrix(y_true: object, y_pred: object, n_classes: int | None = None) -> np.ndarray:
    """Counts ``[C, C]`` with rows = true class, columns = predicted class."""
    t = _as_int_labels(y_true, "y_true")
    p = _as_int_labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape[0]} vs {p.shape[0]}")
    if n_classes is None:
        n_classes = int(max(t.max(initial=-1), p.max(initial=-1))) + 1
    if t.size and max(t.max(), p.max()) >= n_classes:
        raise ValueError(f"a class index exceeds n_classes={n_classes}")
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def balanced_accuracy(y_true: object, y_pred: object, n_classes: int | None = None) -> float:
    """Mean per-class recall over classes present in ``y_true``."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return float("nan")
    recall = np.diag(cm)[present] / support[present]
    return float(recall.mean())


def macro_f1(y_true: object, y_pred: object, n_classes: int | None = None) -> float:
    """Unweighted mean of per-class F1 over classes present in ``y_true`` or ``y_pred``."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    if not present.any():
        return float("nan")
    # F1 = 2tp / (2tp + fp + fn) equals the harmonic mean of precision and recall, and is 0 (not nan)
    # when tp == 0, which is the convention we document.
    f1 = 2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])
    return float(f1.mean())


def accuracy(y_true: object, y_pred: object) -> float:
    t = _as_int_labels(y_true, "y_true")
    p = _as_int_labels(y_pred, "y_pred")
    return float((t == p).mean()) if t.size else float("nan")


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (needed for the tie-aware Mann-Whitney AUC)."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(sorted_x)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(x)]])
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = 0.5 * (s + 1 + e)  # mean of ranks s+1 .. e
    return ranks


def binary_auc(y_true: object, scores: object) -> float:
    """ROC AUC for labels in {0, 1} and positive-class scores; ``nan`` when only one class is present."""
    t = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if t.shape != s.shape or t.ndim != 1:
        raise ValueError(f"binary_auc needs y_true and scores of the same 1-D shape, got {t.shape} and {s.shape}")
    n_pos = int(t.sum())
    n_neg = int(t.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[t].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc(y_true: object, scores: object) -> float:
    """Binary AUC, or one-vs-rest macro AUC for ``scores`` of shape ``[N, C]`` with ``C > 2``."""
    t = _as_int_labels(y_true, "y_true")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        return binary_auc(t == 1, s)
    if s.ndim != 2 or s.shape[0] != t.shape[0]:
        raise ValueError(f"scores must be [N] or [N, C] with N={t.shape[0]}, got shape {s.shape}")
    if s.shape[1] == 2:
        return binary_auc(t == 1, s[:, 1])
    if t.size and t.max() >= s.shape[1]:
        raise ValueError(f"a label ({int(t.max())}) has no score column (scores have {s.shape[1]} columns)")
    per_class = [binary_auc(t == c, s[:, c]) for c in range(s.shape[1])]
    defined = [a for a in per_class if not math.isnan(a)]
    return float(np.mean(defined)) if defined else float("nan")


def classification_report(
    y_true: object, y_pred: object, *, scores: object | None = None, n_classes: int | None = None
) -> dict[str, object]:
    """All the metrics above as a JSON-friendly dict (``auc`` only when ``scores`` are given)."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    report: dict[str, object] = {
        "n": int(cm.sum()),
        "accuracy": accuracy(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred, cm.shape[0]),
        "macro_f1": macro_f1(y_true, y_pred, cm.shape[0]),
    }
    if scores is not None:
        report["auc"] = roc_auc(y_true, scores)
    report["confusion_matrix"] = cm.tolist()
    return report
