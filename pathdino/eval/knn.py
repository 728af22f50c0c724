"""Weighted k-nearest-neighbour classification on frozen features, as in DINO/DINOv2's kNN evaluation.

Features are L2-normalised; each test item takes its ``k`` most cosine-similar training items, and each
neighbour votes for its class with weight ``exp(sim / T)`` (T = 0.07). The vote totals, divided by their sum,
serve as class scores for AUC; the prediction is the class with the largest total.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pathdino.eval.metrics import classification_report

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    n_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk_size: int = 1024,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Normalised weighted votes ``[N_query, n_classes]`` (rows sum to 1).

    ``k`` is capped at the number of training items. Queries are processed in chunks so the similarity matrix
    never exceeds ``chunk_size x N_train``. Similarities are computed on ``device``; the result is on the CPU.
    """
    if train_features.shape[0] == 0:
        raise ValueError("kNN needs at least one training feature")
    if temperature <= 0:
        raise ValueError(f"kNN temperature must be > 0, got {temperature}")
    if k < 1:
        raise ValueError(f"kNN k must be >= 1, got {k}")
    train = F.normalize(train_features.to(device).float(), dim=1)
    labels = train_labels.to(device).long()
    k = min(k, train.shape[0])
    out = []
    for start in range(0, query_features.shape[0], chunk_size):
        q = F.normalize(query_features[start : start + chunk_size].to(device).float(), dim=1)
        sim, idx = (q @ train.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(q.shape[0], n_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, labels[idx], weights)
        out.append((votes / votes.sum(dim=1, keepdim=True)).cpu())
    if not out:
        return torch.zeros(0, n_classes)
    return torch.cat(out)


def knn_evaluate(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    n_classes: int,
    ks: Sequence[int] = (DEFAULT_K,),
    temperature: float = DEFAULT_TEMPERATURE,
    device: str | torch.device = "cpu",
) -> dict[str, object]:
    """Metrics for each ``k`` in ``ks``: ``{"temperature": T, "by_k": {"20": {...metrics, "k_effective": 20}}}``."""
    by_k: dict[str, object] = {}
    for k in ks:
        scores = knn_scores(train_features, train_labels, test_features, n_classes, k, temperature, device=device)
        report = classification_report(
            test_labels.numpy(), scores.argmax(dim=1).numpy(), scores=scores.numpy(), n_classes=n_classes
        )
        report["k_effective"] = min(int(k), int(train_features.shape[0]))
        by_k[str(int(k))] = report
    return {"temperature": temperature, "by_k": by_k}
