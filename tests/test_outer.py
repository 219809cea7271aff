"""Every formula of the outer step against a hand computation."""

from __future__ import annotations

import pytest
import torch

from locod.peer.outer import (
    bounded_mean,
    merge,
    nesterov_step,
    outer_gradient,
    tensor_hash,
    weighted_mean,
)


def test_outer_gradient_is_global_minus_local() -> None:
    g = torch.tensor([1.0, 2.0, -3.0])
    local = torch.tensor([0.5, 2.5, -3.0])
    assert outer_gradient(g, local).tolist() == [0.5, -0.5, 0.0]


def test_weighted_mean_by_hand() -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([4.0, 3.0])
    # (1·a + 2·b) / 3 = ([1, 0] + [8, 6]) / 3 = [3, 2]
    assert weighted_mean([(a, 1.0), (b, 2.0)]).tolist() == [3.0, 2.0]
    with pytest.raises(ValueError, match="positive"):
        weighted_mean([(a, 0.0)])
    with pytest.raises(ValueError, match="at least one"):
        weighted_mean([])


def test_nesterov_step_by_hand() -> None:
    theta = torch.tensor([1.0])
    m = torch.tensor([0.0])
    # Step 1: m = 0.9·0 + 0.5 = 0.5; update = 0.5 + 0.9·0.5 = 0.95; θ = 1 − 0.4·0.95 = 0.62
    nesterov_step(theta, m, torch.tensor([0.5]), lr=0.4, momentum_factor=0.9)
    assert m.item() == pytest.approx(0.5)
    assert theta.item() == pytest.approx(0.62)
    # Step 2 with Δ̄ = 0.25: m = 0.45 + 0.25 = 0.7; update = 0.25 + 0.63 = 0.88; θ = 0.268
    nesterov_step(theta, m, torch.tensor([0.25]), lr=0.4, momentum_factor=0.9)
    assert m.item() == pytest.approx(0.7)
    assert theta.item() == pytest.approx(0.268)


def test_nesterov_step_matches_torch_sgd() -> None:
    torch.manual_seed(0)
    ours = torch.randn(50)
    reference = torch.nn.Parameter(ours.clone())
    momentum = torch.zeros(50)
    sgd = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=True)
    for _ in range(5):
        delta = torch.randn(50)
        nesterov_step(ours, momentum, delta, lr=0.7, momentum_factor=0.9)
        reference.grad = delta.clone()
        sgd.step()
    torch.testing.assert_close(ours, reference.detach(), rtol=0, atol=1e-6)


def test_plain_sgd_with_lr_one_averages_the_peers() -> None:
    theta_g = torch.tensor([2.0, 2.0])
    peers = [torch.tensor([1.0, 3.0]), torch.tensor([3.0, 5.0])]
    mean = weighted_mean([(outer_gradient(theta_g, p), 1.0) for p in peers])
    nesterov_step(theta_g, torch.zeros(2), mean, lr=1.0, momentum_factor=0.0)
    assert theta_g.tolist() == [2.0, 4.0]


def test_merge_by_hand() -> None:
    local, global_ = torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0])
    assert merge(local, global_, 0.5).tolist() == [2.0, 2.0]
    assert merge(local, global_, 0.25).tolist() == [2.5, 1.5]
    assert merge(local, global_, 0.0).tolist() == [3.0, 1.0]
    assert merge(local, global_, 1.0).tolist() == [1.0, 3.0]


def test_tensor_hash_sees_every_bit() -> None:
    x = torch.tensor([1.0, 2.0])
    y = x.clone()
    assert tensor_hash(x) == tensor_hash(y)
    y.view(torch.int32)[1] += 1  # one ulp
    assert tensor_hash(x) != tensor_hash(y)


def test_bounded_mean_caps_an_outlier_at_the_median_norm_times_the_factor() -> None:
    honest = [(torch.tensor([3.0, 4.0]), 1.0), (torch.tensor([0.0, 5.0]), 1.0)]  # norms 5, 5
    huge = (torch.tensor([300.0, 400.0]), 1.0)  # norm 500
    mean, scaled = bounded_mean([*honest, huge], clip_factor=2.0)
    # The outlier is scaled to norm 2·5 = 10: [6, 8]. Mean = ([3,4] + [0,5] + [6,8]) / 3.
    assert scaled == 1
    torch.testing.assert_close(mean, torch.tensor([3.0, 17.0 / 3.0]))
    unbounded, none = bounded_mean([*honest, huge], clip_factor=0.0)
    assert none == 0
    torch.testing.assert_close(unbounded, weighted_mean([*honest, huge]))
    same, zero = bounded_mean(honest, clip_factor=2.0)
    assert zero == 0 and torch.equal(same, weighted_mean(honest))
