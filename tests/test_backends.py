"""Backend selection (``equss.backends``): forcing, the environment variable, auto dispatch, scoping, describe."""

from __future__ import annotations

import pytest
import torch

import equss
from equss import backends


def test_forcing_a_missing_backend_raises_with_fix(monkeypatch):
    missing = backends.BackendInfo(
        "ext", False, (), "pretend it failed: undefined symbol foo", "pip install ..."
    )
    monkeypatch.setitem(backends._infos, "ext", missing)
    with (
        equss.use_backend("ext"),
        pytest.raises(RuntimeError, match="undefined symbol foo.*Fix: pip install"),
    ):
        equss.pq_assign(torch.randn(3, 1, 2), torch.randn(1, 2, 2))
    assert "pretend it failed" in equss.describe()
    assert "fix: pip install ..." in equss.describe()


def test_forcing_a_backend_on_a_device_it_cannot_run_on_says_why(monkeypatch):
    cuda_only = backends.BackendInfo("triton", True, ("cuda",), "triton x.y; runs on CUDA tensors")
    monkeypatch.setitem(backends._infos, "triton", cuda_only)
    with (
        equss.use_backend("triton"),
        pytest.raises(RuntimeError, match="cannot run on cpu.*TRITON_INTERPRET=1"),
    ):
        backends.select("cpu")


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("EQUSS_BACKEND", "torch")
    assert backends.select("cpu") == "torch"
    monkeypatch.setenv("EQUSS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="EQUSS_BACKEND"):
        backends.select("cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        with equss.use_backend("cuda-magic"):
            pass


def test_use_backend_overrides_the_env_var(monkeypatch):
    monkeypatch.setenv("EQUSS_BACKEND", "ext")
    with equss.use_backend("torch"):
        assert backends.select("cpu") == "torch"


def test_auto_prefers_extension_on_cpu(monkeypatch):
    monkeypatch.delenv("EQUSS_BACKEND", raising=False)
    expected = "ext" if backends.available("ext", "cpu") else "torch"
    with equss.use_backend("auto"):
        assert backends.select("cpu") == expected
    assert backends.select("cpu") == expected  # auto is the default


def test_use_backend_is_scoped():
    before = getattr(backends._forced, "name", None)
    with equss.use_backend("torch"):
        assert backends.select("cpu") == "torch"
        with equss.use_backend("auto"):
            assert backends._requested() == "auto"
        assert backends._requested() == "torch"
    assert getattr(backends._forced, "name", None) == before
    assert backends._requested() in ("auto", "torch", "ext", "triton")


def test_describe_mentions_every_backend():
    text = equss.describe()
    for name in backends.BACKENDS:
        assert name in text
    assert "dispatch:" in text and "cpu -> " in text


def test_forced_backend_runs_every_op(backend, monkeypatch):
    """Each public op reaches the forced backend's implementation (a spy on its namespace), never another."""
    ns = backends.get_backend(backend.device)
    calls: list[str] = []
    for op in backends.OP_NAMES:
        fn = getattr(ns, op)

        def spy(*args, _fn=fn, _op=op, **kwargs):
            calls.append(_op)
            return _fn(*args, **kwargs)

        monkeypatch.setattr(ns, op, spy)
    assert backends.select(backend.device) == backend.name
    x = backend.to(torch.randn(5, 2, 3))
    cb = backend.to(torch.randn(2, 4, 3)).requires_grad_(True)
    codes, _ = equss.pq_assign(x, cb.detach())
    equss.pq_gather(codes, cb).sum().backward()
    counts, sums = equss.pq_cluster_stats(x, codes, 4)
    cs, es, cbuf = backend.to(torch.zeros(2, 4)), backend.to(torch.zeros(2, 4, 3)), cb.detach().clone()
    equss.pq_ema_apply_(counts, sums, cs, es, cbuf)
    equss.pq_assign_gather(x, cb.detach())
    assert sorted(set(calls)) == sorted(backends.OP_NAMES), calls
