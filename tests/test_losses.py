"""dpo_loss against the papers' formulas, written out here independently of the library."""

import math

import pytest
import torch

from dpo_minimal import dpo_loss

torch.manual_seed(0)
B = 16
PC, PR, RC, RR = (torch.randn(B, dtype=torch.float64) * 5 for _ in range(4))
LC, LR = torch.randint(1, 40, (B,)).double(), torch.randint(1, 40, (B,)).double()


def sig(x):
    return 1 / (1 + torch.exp(-x))


def h():
    return (PC - RC) - (PR - RR)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_sigmoid_is_dpo_eq7(beta):
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=beta)
    expected = -torch.log(sig(beta * (PC - RC) - beta * (PR - RR)))
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(chosen, beta * (PC - RC))
    torch.testing.assert_close(rejected, beta * (PR - RR))


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_cdpo_label_smoothing(eps):
    beta = 0.2
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, label_smoothing=eps)
    # cDPO: the label is flipped with probability eps.
    expected = -(1 - eps) * torch.log(sig(beta * h())) - eps * torch.log(sig(-beta * h()))
    torch.testing.assert_close(losses, expected)


def test_robust_dpo():
    beta, eps = 0.3, 0.2
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="robust", label_smoothing=eps)
    expected = ((1 - eps) * -torch.log(sig(beta * h())) + eps * torch.log(sig(-beta * h()))) / (
        1 - 2 * eps
    )
    torch.testing.assert_close(losses, expected)


def test_ipo_eq17_on_averaged_log_ratios():
    beta = 0.1
    losses, chosen, rejected = dpo_loss(
        PC, PR, RC, RR, beta=beta, loss_type="ipo", chosen_lengths=LC, rejected_lengths=LR
    )
    h_avg = (PC - RC) / LC - (PR - RR) / LR
    torch.testing.assert_close(losses, (h_avg - 1 / (2 * beta)) ** 2)
    torch.testing.assert_close(chosen - rejected, beta * h_avg)


def test_hinge():
    beta = 0.5
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="hinge")
    torch.testing.assert_close(losses, torch.clamp(1 - beta * h(), min=0))


def test_simpo_is_reference_free():
    beta, gamma = 2.0, 0.5
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="simpo",
                            chosen_lengths=LC, rejected_lengths=LR, simpo_gamma=gamma)
    expected = -torch.log(sig(beta * PC / LC - beta * PR / LR - gamma))
    torch.testing.assert_close(losses, expected)
    other, _, _ = dpo_loss(PC, PR, RC * 0, RR * 7, beta=beta, loss_type="simpo",
                           chosen_lengths=LC, rejected_lengths=LR, simpo_gamma=gamma)
    torch.testing.assert_close(losses, other)


def test_policy_equal_to_reference_gives_ln2():
    losses, chosen, rejected = dpo_loss(PC, PR, PC.clone(), PR.clone(), beta=0.1)
    torch.testing.assert_close(losses, torch.full((B,), math.log(2), dtype=torch.float64))
    assert (chosen - rejected).abs().max() == 0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_stable_at_beta_h_1e4_in_float32(sign):
    z = torch.zeros(3)
    pc = torch.full((3,), sign * 1e4, requires_grad=True)
    for loss_type, eps in [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1), ("hinge", 0.0)]:
        losses, _, _ = dpo_loss(pc, z, z, z, beta=1.0, loss_type=loss_type, label_smoothing=eps)
        assert torch.isfinite(losses).all(), loss_type
        (grad,) = torch.autograd.grad(losses.sum(), pc)
        assert torch.isfinite(grad).all(), loss_type
    losses, _, _ = dpo_loss(pc, z, z, z, beta=1.0)
    expected = 0.0 if sign > 0 else 1e4  # -log sigma(1e4) ~ 0, -log sigma(-1e4) ~ 1e4
    torch.testing.assert_close(losses, torch.full((3,), expected))


def test_gradient_is_minus_beta_sigma_minus_beta_h():
    beta = 0.7
    pc = PC.clone().requires_grad_(True)
    pr = PR.clone().requires_grad_(True)
    losses, _, _ = dpo_loss(pc, pr, RC, RR, beta=beta)
    gc, gr = torch.autograd.grad(losses.sum(), (pc, pr))
    torch.testing.assert_close(gc, -beta * sig(-beta * h()))
    torch.testing.assert_close(gr, beta * sig(-beta * h()))


def test_unweighted_has_constant_gradient():
    pc = PC.clone().requires_grad_(True)
    losses, _, _ = dpo_loss(pc, PR, RC, RR, beta=0.1, loss_type="unweighted")
    (gc,) = torch.autograd.grad(losses.sum(), pc)
    torch.testing.assert_close(gc, -torch.ones(B, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss_type="kto_pair"), "unknown loss_type"),
        (dict(beta=0.0), "beta must be a finite number > 0"),
        (dict(beta=-1.0), "beta must be a finite number > 0"),
        (dict(label_smoothing=0.5), "label_smoothing"),
        (dict(label_smoothing=-0.1), "label_smoothing"),
        (dict(loss_type="ipo"), "chosen_lengths"),
        (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing applies"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dpo_loss(PC, PR, RC, RR, **kwargs)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(PC, PR[:3], RC, RR)
    with pytest.raises(ValueError, match="1-D"):
        dpo_loss(PC[None], PR[None], RC[None], RR[None])
