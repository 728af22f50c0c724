"""DINO, iBOT, KoLeo and KDE losses on hand-checkable cases, plus a 2-process gloo check of the collectives."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pathdino.losses import (
    DINOLoss,
    IBOTPatchLoss,
    KDELoss,
    KoLeoLoss,
    PrototypeTargets,
    build_uniformity_loss,
    gather_masked_tokens,
    kde_loss,
    koleo_loss,
    masked_token_weights,
    sinkhorn_knopp,
)

K = 16


# ---------------------------------------------------------------------------------------------------------- DINO


def _reference_dinov2(student_global, student_local, teacher_probs, n_global, batch, student_temp=0.1):
    """DINOv2's formula written out term by term (ssl_meta_arch + DINOLoss), for 2 global crops."""

    def ce_mean(t, s):
        return -(t * F.log_softmax(s / student_temp, dim=-1)).sum(-1).mean()

    t_chunks = teacher_probs.chunk(n_global)
    n_local = student_local.shape[0] // batch
    n_terms = n_global * (n_global - 1) + n_global * n_local
    local = sum(ce_mean(t, s) for s in student_local.chunk(n_local) for t in t_chunks) / n_terms
    swapped = torch.cat([t_chunks[1], t_chunks[0]])
    global_ = ce_mean(swapped, student_global) * 2 / n_terms
    return global_, local


def test_dino_loss_matches_dinov2_normalisation():
    torch.manual_seed(0)
    batch, n_local = 4, 3
    loss = DINOLoss(K)
    teacher = loss.teacher_targets(torch.randn(2 * batch, K), teacher_temp=0.04)
    s_global, s_local = torch.randn(2 * batch, K), torch.randn(n_local * batch, K)
    global_term, local_term = loss.forward_terms(s_global, s_local, teacher, n_global_crops=2)
    ref_global, ref_local = _reference_dinov2(s_global, s_local, teacher, 2, batch)
    torch.testing.assert_close(global_term, ref_global)
    torch.testing.assert_close(local_term, ref_local)
    torch.testing.assert_close(loss(s_global, s_local, teacher), ref_global + ref_local)


def test_dino_loss_uniform_teacher_gives_log_k():
    loss = DINOLoss(K)
    uniform = torch.full((2 * 3, K), 1.0 / K)
    flat = loss(torch.zeros(6, K), torch.zeros(12, K), uniform)
    assert flat.item() == pytest.approx(math.log(K), rel=1e-6)
    torch.manual_seed(0)
    assert loss(torch.randn(6, K), torch.randn(12, K), uniform).item() > math.log(K)
    assert loss(torch.zeros(6, K), None, uniform).item() == pytest.approx(math.log(K), rel=1e-6)


@pytest.mark.parametrize("method", ["centering", "sinkhorn"])
def test_dino_loss_identical_student_and_teacher_at_low_temperature(method):
    torch.manual_seed(0)
    batch = K  # one prototype per tile, so balanced (Sinkhorn) targets can be one-hot too
    # the same logits for every crop of a tile
    per_tile = F.one_hot(torch.arange(batch) % K, K).float() * 0.5 + 0.01 * torch.randn(batch, K)
    loss = DINOLoss(K, student_temp=0.005, targets=method)
    teacher = loss.teacher_targets(per_tile.repeat(2, 1), teacher_temp=0.005)
    value = loss(per_tile.repeat(2, 1), per_tile.repeat(4, 1), teacher)
    assert 0 <= value.item() < 1e-3


def test_dino_loss_gradients_reach_student_only():
    torch.manual_seed(0)
    loss = DINOLoss(K)
    t_logits = torch.randn(4, K, requires_grad=True)
    s_global, s_local = torch.randn(4, K, requires_grad=True), torch.randn(6, K, requires_grad=True)
    teacher = loss.teacher_targets(t_logits, 0.04)
    assert not teacher.requires_grad
    loss(s_global, s_local, teacher).backward()
    assert s_global.grad.abs().sum() > 0 and s_local.grad.abs().sum() > 0 and t_logits.grad is None


def test_dino_loss_rejects_bad_shapes():
    loss = DINOLoss(K)
    with pytest.raises(ValueError, match="multiple of n_global_crops"):
        loss(torch.zeros(5, K), None, torch.zeros(5, K))
    with pytest.raises(ValueError, match="must match teacher"):
        loss(torch.zeros(4, K), None, torch.zeros(6, K))
    with pytest.raises(ValueError, match=r"\[L\*2"):
        loss(torch.zeros(4, K), torch.zeros(3, K), torch.zeros(4, K))


# ---------------------------------------------------------------------------------------------------------- targets


def test_centering_uses_previous_center_then_updates():
    torch.manual_seed(0)
    targets = PrototypeTargets(K, "centering", center_momentum=0.9)
    previous = torch.randn(1, K)
    targets.center.copy_(previous)
    z = torch.randn(10, K)
    probs = targets(z, teacher_temp=0.07)
    torch.testing.assert_close(probs, F.softmax((z - previous) / 0.07, dim=-1))
    torch.testing.assert_close(targets.center, 0.9 * previous + 0.1 * z.mean(0, keepdim=True))
    targets(z[:0], 0.07)  # no rows: center unchanged
    torch.testing.assert_close(targets.center, 0.9 * previous + 0.1 * z.mean(0, keepdim=True))
    assert "center" in targets.state_dict()


def test_sinkhorn_balances_prototypes_where_centering_does_not():
    torch.manual_seed(0)
    n_rows, n_proto = 64, 8
    z = torch.randn(n_rows, n_proto) * 0.3
    z[:, 0] += 1.0  # every row prefers prototype 0
    sk = sinkhorn_knopp(z, teacher_temp=0.1, n_iterations=3)
    ce = PrototypeTargets(n_proto, "centering")(z, teacher_temp=0.1)
    for probs in (sk, ce):
        torch.testing.assert_close(probs.sum(-1), torch.ones(n_rows))
    marg_sk, marg_ce = sk.sum(0), ce.sum(0)
    assert marg_sk.max() / marg_sk.min() < 3  # 3 iterations: roughly n_rows / n_proto each
    assert marg_ce.max() / marg_ce.min() > 100
    marg_converged = sinkhorn_knopp(z, teacher_temp=0.1, n_iterations=50).sum(0)
    torch.testing.assert_close(marg_converged, torch.full((n_proto,), n_rows / n_proto))
    # finite at very low temperature (global max subtracted before exp)
    assert torch.isfinite(sinkhorn_knopp(z * 50, teacher_temp=0.01)).all()


# ---------------------------------------------------------------------------------------------------------- iBOT


def _ibot_case():
    torch.manual_seed(0)
    n_crops, n_patches = 4, 9  # 2 global crops x 2 tiles
    masks = torch.zeros(n_crops, n_patches, dtype=torch.bool)
    masks[0, [1]] = True
    masks[2, [0, 4, 8]] = True  # crops 1 and 3 unmasked
    student = torch.randn(n_crops, n_patches, K, requires_grad=True)
    teacher = F.softmax(torch.randn(n_crops, n_patches, K), dim=-1)
    return masks, student, teacher


def test_ibot_loss_per_image_mean_over_masked_tokens():
    masks, student, teacher = _ibot_case()
    loss = IBOTPatchLoss(K)
    value = loss(gather_masked_tokens(student, masks), gather_masked_tokens(teacher, masks), masks, 2)
    ce = -(teacher * F.log_softmax(student / 0.1, dim=-1)).sum(-1)  # [crops, patches]
    expected = (ce[0, 1] + ce[2, [0, 4, 8]].mean()) / 4  # over all 4 global crops; x 2 / G = 1
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(masked_token_weights(masks), torch.tensor([1.0, 1 / 3, 1 / 3, 1 / 3]))
    value.backward()
    assert student.grad[~masks].abs().sum() == 0 and student.grad[masks].abs().sum() > 0


def test_ibot_loss_ignores_unmasked_student_logits():
    masks, student, teacher = _ibot_case()
    loss = IBOTPatchLoss(K)

    def run(s):
        return loss(gather_masked_tokens(s, masks), gather_masked_tokens(teacher, masks), masks, 2)

    base = run(student)
    changed_unmasked = student.detach().clone()
    changed_unmasked[~masks] = torch.randn(int((~masks).sum()), K) * 10
    torch.testing.assert_close(run(changed_unmasked), base)
    changed_masked = student.detach().clone()
    changed_masked[2, 4] += torch.randn(K) * 10
    assert not torch.allclose(run(changed_masked), base)


def test_ibot_sinkhorn_targets_and_shape_checks():
    masks, _, _ = _ibot_case()
    loss = IBOTPatchLoss(K, targets="sinkhorn")
    t = loss.teacher_targets(torch.randn(int(masks.sum()), K), teacher_temp=0.07)
    torch.testing.assert_close(t.sum(-1), torch.ones(4))
    with pytest.raises(ValueError, match="masks select"):
        loss(torch.zeros(3, K), torch.zeros(3, K), masks, 2)
    with pytest.raises(ValueError, match="do not match masks"):
        gather_masked_tokens(torch.zeros(4, 8, 3), masks)


# ---------------------------------------------------------------------------------------------------------- KoLeo / KDE


def _clustered_and_spread(n=16, d=8):
    torch.manual_seed(0)
    spread = torch.randn(n, d)
    clustered = torch.randn(1, d) + 0.05 * torch.randn(n, d)
    return clustered, spread


def test_koleo_matches_nearest_neighbour_formula_without_duplicates():
    _, spread = _clustered_and_spread()
    x = F.normalize(spread, dim=-1)
    dist_matrix = torch.cdist(x, x) + torch.eye(len(x)) * 10
    expected = -torch.log(dist_matrix.min(dim=1).values).mean()
    torch.testing.assert_close(koleo_loss(spread), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["koleo", "kde"])
def test_uniformity_losses_prefer_spread_points_and_survive_duplicates(name):
    reg = build_uniformity_loss(name)
    clustered, spread = _clustered_and_spread()
    assert reg(clustered) > reg(spread)
    duplicated = torch.cat([spread[:8], spread[:8]]).requires_grad_(True)  # every tile twice
    value = reg(duplicated)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(duplicated.grad).all()
    same = spread[:1].repeat(6, 1).requires_grad_(True)  # nothing but duplicates
    value = reg(same)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(same.grad).all()
    # per global-crop chunk, summed
    two = torch.cat([clustered, spread])
    torch.testing.assert_close(reg(two, n_chunks=2), reg(clustered) + reg(spread))


def test_koleo_guard_uses_nearest_distinct_neighbour():
    pts = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    # duplicates skip each other: both see [0, 1] at sqrt(2); [0, 1] sees them at sqrt(2) too
    assert koleo_loss(pts).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-5)
    assert koleo_loss(pts.half()).dtype == torch.float32
    assert isinstance(build_uniformity_loss("koleo", duplicate_tol=1e-2), KoLeoLoss)
    assert isinstance(build_uniformity_loss("kde", kappa=2.0), KDELoss)
    with pytest.raises(ValueError, match="expected 'koleo' or 'kde'"):
        build_uniformity_loss("uniform")


def test_kde_value_bounds():
    same = torch.ones(5, 4)
    assert kde_loss(same).item() == pytest.approx(0.0, abs=1e-6)
    _, spread = _clustered_and_spread()
    assert kde_loss(spread).item() < 0


# ---------------------------------------------------------------------------------------------------------- distributed

# Rows per process; rank 1 has no iBOT tokens in the second case (a real situation with few masked crops).
SPLITS = {"dino": (6, 10), "ibot": (7, 0)}


def _shard(x: torch.Tensor, split: tuple[int, int], rank: int) -> torch.Tensor:
    return x[: split[0]] if rank == 0 else x[split[0] : split[0] + split[1]]


def _distributed_worker(rank: int, world: int, init_file: str, data: dict, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for case, split in SPLITS.items():
            logits = _shard(data[case], split, rank)
            results[f"{case}_sinkhorn"] = sinkhorn_knopp(logits, teacher_temp=0.05, n_iterations=3)
            targets = PrototypeTargets(K, "centering")
            targets.center.copy_(data["center"])
            results[f"{case}_centering"] = targets(logits, teacher_temp=0.05)
            results[f"{case}_center"] = targets.center.clone()
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_targets_equal_single_process_on_concatenated_batch(tmp_path):
    torch.manual_seed(0)
    data = {case: torch.randn(sum(split), K) * 2 for case, split in SPLITS.items()}
    data["center"] = torch.randn(1, K) * 0.1
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), data, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for case in SPLITS:
        full = data[case]
        expected_sk = sinkhorn_knopp(full, teacher_temp=0.05, n_iterations=3)
        torch.testing.assert_close(torch.cat([r[f"{case}_sinkhorn"] for r in ranks]), expected_sk)
        single = PrototypeTargets(K, "centering")
        single.center.copy_(data["center"])
        expected_ce = single(full, teacher_temp=0.05)
        torch.testing.assert_close(torch.cat([r[f"{case}_centering"] for r in ranks]), expected_ce)
        for r in ranks:  # every process ends with the center of the whole batch
            torch.testing.assert_close(r[f"{case}_center"], single.center)
    # and the distributed result differs from what each process would compute alone
    alone = sinkhorn_knopp(_shard(data["dino"], SPLITS["dino"], 0), teacher_temp=0.05)
    assert not torch.allclose(alone, ranks[0]["dino_sinkhorn"], atol=1e-3)
