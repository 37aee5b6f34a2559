"""nmtkit's CPU dropout draws its mask from 15-bit lanes of 64-bit random words; it must behave like
nn.Dropout: the right drop rate in every lane, unbiased values, masked gradients, eval identity."""

from __future__ import annotations

import pytest
import torch

from nmtkit.dropout import Dropout, cpu_dropout


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_drop_rate_is_p_in_each_of_the_four_lanes_and_kept_values_are_scaled(p: float) -> None:
    torch.manual_seed(0)
    y = cpu_dropout(torch.ones(250_000, 4), p)  # column j is lane j of every 64-bit word
    dropped = (y == 0).float().mean(dim=0)
    torch.testing.assert_close(dropped, torch.full((4,), p), atol=0.004, rtol=0.0)
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - round(p * 2**15) / 2**15)))
    assert abs(y.mean().item() - 1.0) < 0.01  # unbiased: E[dropout(x)] = x


def test_gradient_is_the_same_mask_as_the_output() -> None:
    torch.manual_seed(1)
    x = torch.randn(64, 30, 256, requires_grad=True)
    y = cpu_dropout(x, 0.1)
    y.sum().backward()
    torch.testing.assert_close(x.grad * x.detach(), y.detach())  # grad is 0 or 1/(1-p) where y is 0 or x/(1-p)


def test_masks_follow_the_seed_and_differ_between_calls() -> None:
    torch.manual_seed(2)
    a, b = cpu_dropout(torch.ones(1000), 0.5), cpu_dropout(torch.ones(1000), 0.5)
    torch.manual_seed(2)
    assert torch.equal(cpu_dropout(torch.ones(1000), 0.5), a)
    assert not torch.equal(a, b)


def test_module_is_identity_in_eval_mode_and_at_p_zero_and_keeps_the_dtype() -> None:
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    module = Dropout(0.2)
    assert module.train()(x).dtype == torch.bfloat16
    assert torch.equal(module.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.count_nonzero(Dropout(1.0).train()(x)) == 0


def test_probability_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match="dropout probability must be in"):
        Dropout(1.5)
