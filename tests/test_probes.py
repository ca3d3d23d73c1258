"""The cluster and linear probes: learning, gradients, shapes, upsampling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from equss.evaluate import ConfusionMatrix
from equss.nn.probes import ClusterProbe, LinearProbe, upsample_to

pytestmark = pytest.mark.usefixtures("one_thread")
def t(values):
    return torch.tensor(values, dtype=torch.long)


# ------------------------------------------------------------------------------------------- probes


def _separable_features(g, n_classes=3, D=8, noise=0.3):
    label = torch.randint(0, n_classes, (4, 8, 8), generator=g)
    centers = torch.eye(D)[:n_classes] * 3.0
    x = centers[label].permute(0, 3, 1, 2) + noise * torch.randn(4, D, 8, 8, generator=g)
    return x, label


def test_cluster_probe_learns_separable_clusters():
    # Hard assignment gives no gradient to a centroid that wins no pixel, so an init where one centroid
    # is nearest to two classes never recovers (about half of random 3-centroid inits here; STEGO's
    # probe behaves the same, see the next test). Seed 2 is an init where each centroid wins a class.
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    x, label = _separable_features(g)
    probe = ClusterProbe(8, 3)
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    first = probe.loss(x).item()
    for _ in range(150):
        opt.zero_grad()
        loss = probe.loss(x)
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.3
    assert loss.item() < -0.9  # mean best cosine close to 1
    cm = ConfusionMatrix(3)
    cm.update(probe.predict(x), label)
    assert cm.compute("hungarian").accuracy > 99.0
    lp = probe.log_probs(x, alpha=2.0)
    sim = probe(x)
    torch.testing.assert_close(lp, F.log_softmax(2.0 * sim, dim=1))
    assert torch.equal(lp.argmax(1), probe.predict(x))


def test_cluster_probe_gradient_reaches_only_winning_centroids():
    probe = ClusterProbe(2, 3)
    with torch.no_grad():
        probe.clusters.copy_(torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, -1.0]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).t().reshape(1, 2, 1, 2)  # pixels along e1 and e2
    loss = probe.loss(x)
    loss.backward()
    # hand-computed: best cosines are cos(e1, (1, .1)) = cos(e2, (.1, 1)) = 1/sqrt(1.01)
    assert loss.item() == pytest.approx(-1.0 / math.sqrt(1.01), rel=1e-6)
    grad = probe.clusters.grad
    assert grad[:2].abs().sum() > 0 and torch.equal(grad[2], torch.zeros(2))
    assert probe.predict(x).tolist() == [[[0, 1]]]


def test_cluster_probe_extra_clusters_and_shapes():
    probe = ClusterProbe(4, 3, extra_clusters=2)
    assert probe(torch.randn(2, 4, 3, 5)).shape == (2, 5, 3, 5)
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        probe(torch.randn(2, 5, 3, 3))


def test_linear_probe_ignores_invalid_labels():
    torch.manual_seed(0)
    probe = LinearProbe(6, 3)
    x = torch.randn(2, 6, 4, 4)
    label = torch.randint(0, 3, (2, 4, 4))
    label[0, 0] = -1
    label[1, 2, :2] = 255  # >= n_classes: ignored as well
    valid = (label >= 0) & (label < 3)
    logits = probe(x).permute(0, 2, 3, 1)[valid]
    expected = F.cross_entropy(logits, label[valid])
    torch.testing.assert_close(probe.loss(x, label), expected)
    # the features of ignored pixels do not matter
    x2 = x.clone()
    x2[0, :, 0] = 100.0
    torch.testing.assert_close(probe.loss(x2, label), expected)
    # nothing valid: zero loss, still differentiable (cross_entropy alone would give NaN)
    empty = probe.loss(x, torch.full((2, 4, 4), -1))
    empty.backward()
    assert empty.item() == 0.0 and probe.conv.weight.grad is not None


def test_linear_probe_upsamples_logits_to_label_size():
    torch.manual_seed(0)
    probe = LinearProbe(5, 2)
    x = torch.randn(1, 5, 4, 4)
    label = torch.randint(0, 2, (1, 8, 8))
    logits = F.interpolate(probe(x), size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(probe.loss(x, label), F.cross_entropy(logits, label))


def test_upsample_to():
    x = torch.full((1, 3, 4, 4), 2.0)
    y = upsample_to(x, (8, 12))
    assert y.shape == (1, 3, 8, 12) and torch.allclose(y, torch.full_like(y, 2.0))
    ramp = torch.arange(2.0).view(1, 1, 1, 2).expand(1, 1, 2, 2)
    # align_corners=False: output pixel centres at (j + 0.5)/2 − 0.5 of the input grid → 0, 0.25, 0.75, 1
    assert upsample_to(ramp, (2, 4))[0, 0, 0].tolist() == [0.0, 0.25, 0.75, 1.0]


@pytest.mark.parametrize("h,w,H,W", [(4, 6, 12, 18), (5, 3, 40, 17), (7, 7, 7, 30), (1, 4, 3, 9)])
def test_cluster_loss_at_label_size_equals_upsample_then_loss(h, w, H, W):
    """The authors' training loss: q upsampled bilinearly to the label size, then −mean of the best cosine.
    Computed without the upsampled tensor; it must equal the naive form in value and centroid gradient."""
    from equss.nn.probes import _upsampled_norm

    torch.manual_seed(0)
    probe = ClusterProbe(16, 3, extra_clusters=1)
    x = torch.randn(5, 16, h, w, dtype=torch.float64)
    probe.double()
    up = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
    torch.testing.assert_close(_upsampled_norm(x, (H, W)), up.norm(dim=1), rtol=1e-6, atol=1e-9)
    naive = -probe(up).max(1).values.mean()
    (g_naive,) = torch.autograd.grad(naive, probe.clusters)
    fast = probe.loss(x, size=(H, W))
    (g_fast,) = torch.autograd.grad(fast, probe.clusters)
    torch.testing.assert_close(fast.double(), naive, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_fast, g_naive, rtol=1e-5, atol=1e-9)
    if (h, w) != (H, W):
        assert not torch.allclose(probe.loss(x), naive)  # the feature-resolution loss is another number
