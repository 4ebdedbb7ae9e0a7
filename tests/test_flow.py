"""The rectified-flow conventions, in the one module that holds them."""

from __future__ import annotations

import pytest
import torch

from runtime import flow


def test_time_grid_matches_official():
    assert flow.time_grid(1) == [1000.0]
    assert flow.time_grid(4) == [1000.0, 750.0, 500.0, 250.0]
    with pytest.raises(ValueError):
        flow.time_grid(0)


def test_cfg_only_above_one():
    assert not flow.uses_cfg(0.0) and not flow.uses_cfg(1.0) and flow.uses_cfg(1.5)
    u, c = torch.tensor([1.0]), torch.tensor([3.0])
    assert flow.guided(u, c, 1.5).item() == pytest.approx(4.0)


def test_euler_recovers_a_straight_path_in_one_step():
    x0, x1 = torch.randn(3, 4), torch.randn(3, 4)
    # the ideal velocity of a straight path is constant X1 - X0: one Euler step lands exactly on X1
    out = flow.sample(lambda x, t: flow.velocity_target(x0, x1), x0, num_steps=1)
    torch.testing.assert_close(out, x1)


def test_interpolation_and_unet_time():
    x0, x1 = torch.zeros(2, 1), torch.ones(2, 1)
    t = torch.tensor([0.25, 1.0])
    torch.testing.assert_close(flow.interpolate(x0, x1, t), torch.tensor([[0.25], [1.0]]))
    assert flow.unet_time(0.0) == 1000.0 and flow.unet_time(1.0) == 0.0
    # the sampler visits t_i = i / N, i.e. UNet times 1000 (1 - i/N)
    assert flow.time_grid(5) == [flow.unet_time(i / 5) for i in range(5)]
