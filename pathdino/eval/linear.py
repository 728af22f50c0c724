"""Linear probe: multinomial logistic regression on standardised frozen features, in torch (no scikit-learn).

Objective (per L2 strength ``l2``): mean cross-entropy over the training items + ``l2/2 * ||W||^2`` (the bias is
not penalised), minimised full-batch with L-BFGS (strong-Wolfe line search). Features are standardised with the
training mean and standard deviation. ``l2`` is picked from a small grid by balanced accuracy (ties: lower log
loss) on the validation split, or by stratified k-fold cross-validation on the training split when there is no
validation split; the probe is then refit on the training split and scored on the test split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pathdino.eval.metrics import balanced_accuracy, classification_report

DEFAULT_L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
DEFAULT_MAX_ITER = 200  # L-BFGS iterations per fit; the grid is warm-started, so later fits converge faster
DEFAULT_CV_FOLDS = 3


@dataclass(frozen=True)
class LinearProbe:
    """A fitted probe: ``softmax(((x - mean) / std) @ weight.T + bias)``."""

    mean: torch.Tensor  # [D]
    std: torch.Tensor  # [D]
    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]
    l2: float

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return ((features.float() - self.mean) / self.std) @ self.weight.T + self.bias

    def predict_proba(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features).softmax(dim=1)


def fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    l2: float,
    max_iter: int = DEFAULT_MAX_ITER,
    init: LinearProbe | None = None,
    device: str | torch.device = "cpu",
) -> LinearProbe:
    """Fit one multinomial logistic regression (see the module docstring for the objective).

    The fit runs on ``device``; the returned probe lives on the CPU.
    """
    if features.ndim != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"features [N, D] and labels [N] disagree: {tuple(features.shape)} vs {tuple(labels.shape)}")
    if features.shape[0] == 0:
        raise ValueError("cannot fit a linear probe on zero training items")
    x = features.to(device).float()
    mean = x.mean(dim=0)
    # Constant dimensions (std 0) would divide by zero; 1e-6 keeps them at 0 after centring.
    std = x.std(dim=0, unbiased=False).clamp_min(1e-6)
    x = (x - mean) / std
    y = labels.to(device).long().clone()  # a clone also turns an inference-mode tensor into one autograd may save
    dim = x.shape[1]
    weight = torch.zeros(n_classes, dim, device=device) if init is None else init.weight.to(device).clone()
    bias = torch.zeros(n_classes, device=device) if init is None else init.bias.to(device).clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(
        mean=mean.cpu(), std=std.cpu(), weight=weight.detach().cpu(), bias=bias.detach().cpu(), l2=float(l2)
    )


def stratified_folds(labels: torch.Tensor, n_folds: int, seed: int) -> torch.Tensor:
    """Fold index per item; each class is spread round-robin over the folds after a seeded shuffle."""
    gen = torch.Generator().manual_seed(seed)
    folds = torch.empty(labels.shape[0], dtype=torch.int64)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        folds[idx] = torch.arange(len(idx)) % n_folds
    return folds


def _score(probe: LinearProbe, features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> tuple[float, float]:
    logits = probe.logits(features)
    bal = balanced_accuracy(labels.numpy(), logits.argmax(dim=1).numpy(), n_classes)
    return bal, float(F.cross_entropy(logits, labels.long()))


def select_l2(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    n_classes: int,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    val_features: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    cv_folds: int = DEFAULT_CV_FOLDS,
    max_iter: int = DEFAULT_MAX_ITER,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[float, str, dict[str, float]]:
    """Best ``l2`` from the grid, how it was chosen (``val``, ``cv<k>`` or ``default``) and the score per value."""
    grid = sorted(set(float(v) for v in l2_grid), reverse=True)  # strong -> weak, so warm starts help
    if not grid:
        raise ValueError("l2_grid is empty")
    scores: dict[float, tuple[float, float]] = {}
    if val_features is not None and val_labels is not None and val_features.shape[0] > 0:
        how, init = "val", None
        for l2 in grid:
            init = fit_logistic_regression(train_features, train_labels, n_classes, l2, max_iter, init, device)
            scores[l2] = _score(init, val_features, val_labels, n_classes)
    else:
        n_folds = min(cv_folds, int(torch.bincount(train_labels.long()).max()))
        if len(grid) == 1 or n_folds < 2:
            middle = grid[len(grid) // 2]
            return middle, "default", {}
        how = f"cv{n_folds}"
        folds = stratified_folds(train_labels.long(), n_folds, seed)
        sums = {l2: [0.0, 0.0] for l2 in grid}
        for f in range(n_folds):
            fit_mask, held = folds != f, folds == f
            init = None
            for l2 in grid:
                init = fit_logistic_regression(
                    train_features[fit_mask], train_labels[fit_mask], n_classes, l2, max_iter, init, device
                )
                bal, loss = _score(init, train_features[held], train_labels[held], n_classes)
                sums[l2][0] += bal / n_folds
                sums[l2][1] += loss / n_folds
        scores = {l2: (s[0], s[1]) for l2, s in sums.items()}
    best = max(grid, key=lambda v: (scores[v][0], -scores[v][1]))
    return best, how, {f"{l2:g}": s[0] for l2, s in scores.items()}


def linear_probe_evaluate(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    n_classes: int,
    val_features: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    cv_folds: int = DEFAULT_CV_FOLDS,
    max_iter: int = DEFAULT_MAX_ITER,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, object]:
    """Select ``l2``, refit on the training split, and report test metrics (JSON-friendly dict)."""
    best, how, sel_scores = select_l2(
        train_features, train_labels, n_classes, l2_grid, val_features, val_labels, cv_folds, max_iter, seed, device
    )
    probe = fit_logistic_regression(train_features, train_labels, n_classes, best, max_iter, device=device)
    probs = probe.predict_proba(test_features)
    report = classification_report(
        test_labels.numpy(), probs.argmax(dim=1).numpy(), scores=probs.numpy(), n_classes=n_classes
    )
    train_pred = probe.logits(train_features).argmax(dim=1)
    return {
        "l2": best,
        "selection": how,
        "selection_balanced_accuracy": sel_scores,
        "train_accuracy": float((train_pred == train_labels).float().mean()),
        "test": report,
    }
