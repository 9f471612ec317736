"""The DPO gradient through a policy (notebook 03): the sigma weight, and what dropping it does.

tests/test_losses.py checks the gradient with respect to the log-prob inputs; here the
gradient is taken through a softmax policy's logits, and the tabular trainer's end points are
checked against closed forms written out below.
"""

import torch

from dpo_minimal import dpo_loss
from dpo_minimal.course import bandit

PI_REF = torch.tensor([0.35, 0.25, 0.2, 0.12, 0.08], dtype=torch.float64)
REWARD = torch.tensor([0.5, -1.0, 1.5, 0.0, 1.0])


def test_gradient_through_a_softmax_policy_is_weighted_logprob_difference():
    """grad_theta L = -beta sigma(r_l - r_w) [grad log pi(y_w) - grad log pi(y_l)], per pair."""
    beta = 0.4
    logits = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    logits.requires_grad_(True)
    winners, losers = torch.tensor([0, 2, 4, 1]), torch.tensor([3, 1, 2, 4])
    ref = PI_REF.log()
    logps = torch.log_softmax(logits, -1)
    losses, r_w, r_l = dpo_loss(logps[winners], logps[losers], ref[winners], ref[losers],
                                beta=beta)
    for i in range(len(winners)):
        (grad,) = torch.autograd.grad(losses[i], logits, retain_graph=True)
        pi = logps.detach().exp()
        # d log softmax(theta)_y / d theta = e_y - pi, written out.
        grad_log_w = torch.nn.functional.one_hot(winners[i], 5).double() - pi
        grad_log_l = torch.nn.functional.one_hot(losers[i], 5).double() - pi
        weight = 1 / (1 + torch.exp(r_w[i] - r_l[i]))  # sigma(r_l - r_w)
        torch.testing.assert_close(grad, -beta * weight * (grad_log_w - grad_log_l))


def test_tabular_dpo_fixed_point_is_the_bt_maximum_likelihood_policy():
    """DPO on the bandit = RLHF with the fitted BT reward: pi_ref exp(r_mle / beta) / Z."""
    beta = 0.5
    winners, losers = bandit.sample_preferences(REWARD, 1000, seed=4)
    pi_dpo, _ = bandit.train_tabular(PI_REF.float(), winners, losers, beta, steps=600,
                                     record_every=600)
    pi_rlhf = bandit.rlhf_exact(PI_REF.float(), winners, losers, beta)
    assert bandit.kl(pi_dpo, pi_rlhf) < 1e-5


def test_unweighted_tabular_trajectory_is_linear_in_the_logits():
    """Unweighted: constant gradient -mean(e_w - e_l), so logits_t = log pi_ref + t lr d."""
    steps, lr = 300, 0.5
    winners, losers = bandit.sample_preferences(REWARD, 500, seed=5)
    pi, history = bandit.train_tabular(PI_REF.float(), winners, losers, beta=0.1,
                                       loss_type="unweighted", steps=steps, lr=lr,
                                       record_every=100)
    d = (torch.bincount(winners, minlength=5) - torch.bincount(losers, minlength=5)) / 500
    for row in history:
        expected = torch.softmax(PI_REF.float().log() + row["step"] * lr * d, -1)
        torch.testing.assert_close(row["pi"], expected, rtol=1e-4, atol=1e-5)
    norms = [row["logit_norm"] for row in history]
    increments = [b - a for a, b in zip(norms, norms[1:])]
    assert all(step > 0 for step in increments)  # no fixed point: it grows every record
    # beta does not enter the unweighted loss, so the run is the same for any beta.
    pi_other, _ = bandit.train_tabular(PI_REF.float(), winners, losers, beta=5.0,
                                       loss_type="unweighted", steps=steps, lr=lr)
    torch.testing.assert_close(pi, pi_other)
