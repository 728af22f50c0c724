"""Few-shot evaluation: ``k`` labelled training tiles per class, several seeds, mean ± std.

Classifiers:

- ``simpleshot`` (Wang et al. 2019, "CL2N"; the variant used in UNI's few-shot tables): subtract the mean of the
  support set, L2-normalise, average each class's support features into a prototype, and assign each query to
  the nearest prototype (Euclidean). Class scores for AUC are ``softmax(-squared distance)``.
- ``linear``: the logistic regression of :mod:`pathdino.eval.linear` fit on the support set with a fixed L2
  strength (no validation data exists in the few-shot setting).

A shot count ``k`` is run only when every class has at least ``k`` training items; skipped values are listed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pathdino.eval.linear import fit_logistic_regression
from pathdino.eval.metrics import classification_report

DEFAULT_SHOTS = (1, 2, 4, 8, 16)
DEFAULT_SEEDS = 5
FEWSHOT_LINEAR_L2 = 1e-2  # fixed: there is no validation split to tune on with k labelled tiles per class
_SUMMARISED = ("accuracy", "balanced_accuracy", "macro_f1", "auc")


def sample_support(labels: torch.Tensor, n_classes: int, shots: int, seed: int) -> torch.Tensor:
    """Indices of ``shots`` items per class, drawn without replacement with a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(n_classes):
        idx = (labels == c).nonzero().flatten()
        if len(idx) < shots:
            raise ValueError(f"class {c} has {len(idx)} training items, fewer than {shots} shots")
        picked.append(idx[torch.randperm(len(idx), generator=gen)[:shots]])
    return torch.cat(picked)


def simpleshot_scores(
    support_features: torch.Tensor, support_labels: torch.Tensor, query_features: torch.Tensor, n_classes: int
) -> torch.Tensor:
    """Class scores ``[N_query, C]`` from centred, L2-normalised nearest class means."""
    centre = support_features.float().mean(dim=0)
    s = F.normalize(support_features.float() - centre, dim=1)
    q = F.normalize(query_features.float() - centre, dim=1)
    prototypes = torch.stack([s[support_labels == c].mean(dim=0) for c in range(n_classes)])
    return (-torch.cdist(q, prototypes).pow(2)).softmax(dim=1)


def _mean_std(values: list[float]) -> dict[str, object]:
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    return {
        "mean": float(finite.mean()) if finite.size else float("nan"),
        "std": float(finite.std()) if finite.size else float("nan"),
        "values": [float(v) for v in arr],
    }


def fewshot_evaluate(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    n_classes: int,
    shots: Sequence[int] = DEFAULT_SHOTS,
    n_seeds: int = DEFAULT_SEEDS,
    method: str = "simpleshot",
    seed: int = 0,
) -> dict[str, object]:
    """Per shot count: each metric as ``{"mean", "std", "values"}`` over ``n_seeds`` support draws.

    ``std`` is the population standard deviation (ddof 0) of the per-seed values; undefined values (an AUC
    with one class) are left out of mean and std but kept in ``values``.
    """
    if method not in ("simpleshot", "linear"):
        raise ValueError(f"few-shot method must be 'simpleshot' or 'linear', got {method!r}")
    if n_seeds < 1:
        raise ValueError(f"n_seeds must be >= 1, got {n_seeds}")
    labels = train_labels.long()
    smallest = int(torch.bincount(labels, minlength=n_classes).min())
    by_shots: dict[str, object] = {}
    skipped = []
    for k in sorted(set(int(s) for s in shots)):
        if k < 1 or k > smallest:
            skipped.append(k)
            continue
        per_metric: dict[str, list[float]] = {m: [] for m in _SUMMARISED}
        for rep in range(n_seeds):
            idx = sample_support(labels, n_classes, k, seed + 1000 * k + rep)
            sf, sl = train_features[idx], labels[idx]
            if method == "simpleshot":
                scores = simpleshot_scores(sf, sl, test_features, n_classes)
            else:
                scores = fit_logistic_regression(sf, sl, n_classes, FEWSHOT_LINEAR_L2).predict_proba(test_features)
            report = classification_report(
                test_labels.numpy(), scores.argmax(dim=1).numpy(), scores=scores.numpy(), n_classes=n_classes
            )
            for m in _SUMMARISED:
                per_metric[m].append(float(report[m]))  # type: ignore[arg-type]
        by_shots[str(k)] = {m: _mean_std(v) for m, v in per_metric.items()}
    return {
        "method": method,
        "n_seeds": n_seeds,
        "by_shots": by_shots,
        "skipped_shots": skipped,
        "smallest_class_train_count": smallest,
    }
