"""The tabular lab: closed-form pi*, BT sampling and fitting, tabular DPO and RLHF."""

import math

import torch

from dpo_minimal.course import bandit

PI_REF = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1])
REWARD = torch.tensor([0.0, 1.0, -0.5, 2.0, 0.5])


def test_optimal_policy_is_reference_tilted_by_reward():
    beta = 0.7
    pi = bandit.optimal_policy(PI_REF, REWARD, beta)
    unnormalised = PI_REF * torch.exp(REWARD / beta)
    torch.testing.assert_close(pi, unnormalised / unnormalised.sum())
    # It maximises the objective: random other policies do worse.
    best = bandit.objective(pi, PI_REF, REWARD, beta)
    for seed in range(20):
        other = torch.softmax(torch.randn(5, generator=torch.Generator().manual_seed(seed)), -1)
        assert bandit.objective(other, PI_REF, REWARD, beta) < best


def test_beta_limits():
    torch.testing.assert_close(bandit.optimal_policy(PI_REF, REWARD, 1e6), PI_REF)
    assert bandit.optimal_policy(PI_REF, REWARD, 1e-3).argmax() == REWARD.argmax()


def test_sampled_preferences_follow_bradley_terry():
    w, lo = bandit.sample_preferences(REWARD, 40000, seed=0)
    assert (w != lo).all()
    pair = ((w == 3) & (lo == 0)) | ((w == 0) & (lo == 3))
    p_3_beats_0 = ((w == 3) & pair).float().sum() / pair.float().sum()
    assert abs(p_3_beats_0 - torch.sigmoid(torch.tensor(2.0))) < 0.03
    w, lo = bandit.sample_preferences(REWARD, 1000, deterministic=True, seed=0)
    assert (REWARD[w] > REWARD[lo]).all()


def test_fit_bradley_terry_recovers_centred_scores():
    w, lo = bandit.sample_preferences(REWARD, 20000, seed=1)
    fitted = bandit.fit_bradley_terry(w, lo, 5)
    assert abs(fitted.mean()) < 1e-6
    assert (fitted - (REWARD - REWARD.mean())).abs().max() < 0.1


def test_tabular_dpo_reaches_pi_star_and_unweighted_degenerates():
    beta = 1.0
    w, lo = bandit.sample_preferences(REWARD, 20000, seed=2)
    target = bandit.optimal_policy(PI_REF, REWARD, beta)
    pi, hist = bandit.train_tabular(PI_REF, w, lo, beta, steps=1500)
    assert abs(hist[0]["loss"] - math.log(2)) < 1e-6 and hist[0]["margin"] == 0
    assert bandit.kl(pi, target) < 5e-3
    pi_u, hist_u = bandit.train_tabular(PI_REF, w, lo, beta, loss_type="unweighted", steps=1500)
    assert pi_u.max() > 0.99 and hist_u[-1]["logit_norm"] > 2 * hist[-1]["logit_norm"]


def test_rlhf_exact_and_policy_gradient_approach_pi_star():
    beta = 1.0
    target = bandit.optimal_policy(PI_REF, REWARD, beta)
    w, lo = bandit.sample_preferences(REWARD, 20000, seed=3)
    assert bandit.kl(bandit.rlhf_exact(PI_REF, w, lo, beta), target) < 5e-3
    pi_pg = bandit.rlhf_policy_gradient(PI_REF, REWARD, beta, steps=1500, seed=0)
    assert bandit.kl(pi_pg, target) < 2e-2
