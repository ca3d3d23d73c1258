"""STEGO correspondence loss against hand-computed values (docs/method.md §5)."""

from __future__ import annotations

import math

import pytest
import torch

from equss.losses import (
    STEGO_PRESETS,
    StegoCorrespondenceLoss,
    correspondence_pair_loss,
    derangement,
    sample_points,
)

R = 1 / math.sqrt(2)


def _points(*vectors):
    """Channel vectors → a [1, C, 1, P] 'sampled' tensor (one image, P points in a row)."""
    return torch.tensor(vectors, dtype=torch.float64).t().reshape(1, len(vectors[0]), 1, len(vectors))


def test_pair_loss_single_point_by_hand():
    # F = <(1,0), (1,1)/√2> = 1/√2; Cc = <(3,4)/5, (4,3)/5> = 24/25; loss = -0.96·(0.7071 - 0.1).
    loss, cd = correspondence_pair_loss(_points((1, 0)), _points((1, 1)), _points((3, 4)), _points((4, 3)), 0.1)
    assert loss.shape == (1, 1, 1, 1, 1)
    assert math.isclose(cd.item(), 0.96, rel_tol=1e-12)
    assert math.isclose(loss.item(), -0.96 * (R - 0.1), rel_tol=1e-12)


def test_pair_loss_pointwise_two_points_by_hand():
    # Anchor points p=(1,0), q=(0,1); other image r=(1,0), s=(1,1)/√2.
    # F = [[1, R], [0, R]], global mean 0.60355; row means 0.85355 and 0.35355.
    # Pointwise: F - rowmean + (old mean - new mean 0) = [[0.75, 0.45711], [0.25, 0.95711]].
    # Codes = features, so Cc = F; loss = -Cc·F' = -[[0.75, R·0.45711], [0, R·0.95711]], mean -0.4375.
    f1, f2 = _points((1, 0), (0, 1)), _points((1, 0), (1, 1))
    loss, cd = correspondence_pair_loss(f1, f2, f1, f2, shift=0.0)
    loss = loss.reshape(2, 2)
    expected = -torch.tensor([[0.75, R * (R - 0.25)], [0.0, R * (R + 0.25)]], dtype=torch.float64)
    torch.testing.assert_close(loss, expected)
    assert math.isclose(loss.mean().item(), -0.4375, rel_tol=1e-12)
    # Without pointwise: loss = -F·F.
    loss_raw, _ = correspondence_pair_loss(f1, f2, f1, f2, shift=0.0, pointwise=False)
    torch.testing.assert_close(loss_raw.reshape(2, 2), -torch.tensor([[1, 0.5], [0, 0.5]], dtype=torch.float64))


def test_zero_clamp_removes_negative_code_correlation():
    f = _points((1, 0))
    c1, c2 = _points((1, 0)), _points((-1, 0))  # Cc = -1
    clamped, _ = correspondence_pair_loss(f, f, c1, c2, shift=0.5)
    free, _ = correspondence_pair_loss(f, f, c1, c2, shift=0.5, zero_clamp=False)
    assert clamped.item() == 0.0
    assert math.isclose(free.item(), 1.0 * (1 - 0.5))


def test_sample_points_align_corners_border():
    t = torch.arange(12.0).reshape(1, 1, 3, 4)
    # coords (x, y) = (-1, -1) → top-left, (1, 1) → bottom-right, (3, 0) clamps to the right border.
    coords = torch.tensor([[[[-1.0, -1.0], [1.0, 1.0]], [[3.0, 0.0], [0.0, 0.0]]]])  # [1, 2, 2, 2]
    out = sample_points(t, coords)
    # sample_points swaps the two grid axes (as STEGO does): out[..., a, b] uses coords[:, b, a].
    assert out[0, 0, 0, 0] == 0.0 and out[0, 0, 1, 1] == 5.5
    assert out[0, 0, 0, 1] == 7.0  # coords[0,1,0] = (3, 0): x clamped to 3 (last column), y middle row
    assert out[0, 0, 1, 0] == 11.0


def test_derangement_has_no_fixed_point():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 16):
        for _ in range(50):
            p = derangement(n, generator=g)
            assert not torch.any(p == torch.arange(n)) and p.min() >= 0 and p.max() < n
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1)


def test_total_is_weighted_sum_and_features_get_no_grad():
    g = torch.Generator().manual_seed(1)
    f, f_pos = torch.randn(4, 6, 7, 7, generator=g), torch.randn(4, 6, 7, 7, generator=g)
    z = torch.randn(4, 10, 7, 7, generator=g, requires_grad=True)
    z_pos = torch.randn(4, 10, 7, 7, generator=g, requires_grad=True)
    f.requires_grad_()
    loss_fn = StegoCorrespondenceLoss(STEGO_PRESETS["cityscapes/vit_base_patch8"], feature_samples=5, neg_samples=3)
    total, terms = loss_fn(f, f_pos, z, z_pos, generator=torch.Generator().manual_seed(2))
    c = loss_fn.cfg
    expected = c.pos_intra_weight * terms["pos_intra"] + c.pos_inter_weight * terms["pos_inter"] + c.neg_inter_weight * terms["neg_inter"]
    torch.testing.assert_close(total, expected)
    total.backward()
    assert f.grad is None and z.grad is not None and z_pos.grad is not None
    # Same generator seed → same sampling points → same loss.
    total2, _ = loss_fn(f, f_pos, z, z_pos, generator=torch.Generator().manual_seed(2))
    assert total2.item() == total.item()


def test_loss_rewards_codes_that_follow_the_features():
    """Codes equal to the features should score lower (better) than random codes."""
    g = torch.Generator().manual_seed(3)
    f = torch.randn(8, 16, 9, 9, generator=g)
    f_pos = f.roll(1, dims=0)
    loss_fn = StegoCorrespondenceLoss(feature_samples=7)
    good, _ = loss_fn(f, f_pos, f, f_pos, generator=torch.Generator().manual_seed(4))
    z = torch.randn(8, 16, 9, 9, generator=g)
    bad, _ = loss_fn(f, f_pos, z, z.roll(1, dims=0), generator=torch.Generator().manual_seed(4))
    assert good < bad


def test_bad_shapes():
    loss_fn = StegoCorrespondenceLoss()
    with pytest.raises(ValueError, match=r"f \(2, 3, 4, 4\).*z \(2, 5, 4\)"):
        loss_fn(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4))
