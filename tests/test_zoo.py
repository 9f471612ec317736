"""KTO, ORPO and the on-policy bandit helper, against the formulas written out here."""

import math

import pytest
import torch

from dpo_minimal.course import bandit
from dpo_minimal.losses import kto_loss, orpo_loss

POLICY = torch.tensor([-10.0, -12.0, -8.0, -20.0], dtype=torch.float64)
REFERENCE = torch.tensor([-11.0, -11.5, -9.0, -18.0], dtype=torch.float64)
DESIRABLE = torch.tensor([True, False, True, False])


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_matches_the_value_function_with_its_reference_point():
    beta, lam_d, lam_u = 0.5, 1.0, 1.5
    kl_pol = torch.tensor([-5.0, -6.0, -7.0], dtype=torch.float64)
    kl_ref = torch.tensor([-5.5, -6.0, -6.9], dtype=torch.float64)
    losses, rewards, z0 = kto_loss(POLICY, REFERENCE, DESIRABLE, kl_pol, kl_ref, beta=beta,
                                   lambda_d=lam_d, lambda_u=lam_u)
    z = ((-5.0 + 5.5) + (-6.0 + 6.0) + (-7.0 + 6.9)) / 3  # mean log-ratio of mismatched y'
    assert z0.item() == pytest.approx(z)
    expected = []
    for p, q, d in zip(POLICY.tolist(), REFERENCE.tolist(), DESIRABLE.tolist()):
        r = p - q
        v = lam_d * _sig(beta * (r - z)) if d else lam_u * _sig(beta * (z - r))
        expected.append((lam_d if d else lam_u) - v)
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(rewards, beta * (POLICY - REFERENCE))


def test_kto_reference_point_is_clamped_at_zero_and_carries_no_gradient():
    kl_pol = torch.tensor([-5.0, -6.0], dtype=torch.float64, requires_grad=True)
    kl_ref = torch.tensor([-4.0, -5.0], dtype=torch.float64)  # mean log-ratio -1 < 0
    policy = POLICY.clone().requires_grad_(True)
    losses, _, z0 = kto_loss(policy, REFERENCE, DESIRABLE, kl_pol, kl_ref, beta=0.1)
    assert z0.item() == 0.0
    losses.sum().backward()
    assert kl_pol.grad is None
    # A thumbs-up example's loss falls as its log-prob rises; a thumbs-down one's rises.
    assert policy.grad[0] < 0 and policy.grad[1] > 0
    no_kl, _, z_none = kto_loss(POLICY, REFERENCE, DESIRABLE, beta=0.1)
    assert z_none.item() == 0.0
    torch.testing.assert_close(no_kl, losses.detach())


def test_kto_bad_arguments():
    with pytest.raises(ValueError, match="bool"):
        kto_loss(POLICY, REFERENCE, torch.tensor([1, 0, 1, 0]))
    with pytest.raises(ValueError, match="beta"):
        kto_loss(POLICY, REFERENCE, DESIRABLE, beta=0.0)
    with pytest.raises(ValueError, match="both"):
        kto_loss(POLICY, REFERENCE, DESIRABLE, policy_kl_logps=POLICY)
    with pytest.raises(ValueError, match="shape"):
        kto_loss(POLICY, REFERENCE[:3], DESIRABLE)


def test_orpo_matches_nll_plus_odds_ratio():
    lam = 0.2
    chosen = torch.tensor([-6.0, -30.0, -1.0], dtype=torch.float64)
    rejected = torch.tensor([-9.0, -20.0, -2.0], dtype=torch.float64)
    len_c = torch.tensor([3.0, 10.0, 4.0], dtype=torch.float64)
    len_r = torch.tensor([3.0, 5.0, 2.0], dtype=torch.float64)
    losses, log_or, nll = orpo_loss(chosen, rejected, len_c, len_r, lambda_or=lam)
    expected_loss, expected_or = [], []
    for c, r, lc, lr in zip(chosen.tolist(), rejected.tolist(), len_c.tolist(), len_r.tolist()):
        p_w, p_l = math.exp(c / lc), math.exp(r / lr)
        odds = math.log(p_w / (1 - p_w)) - math.log(p_l / (1 - p_l))
        expected_or.append(odds)
        expected_loss.append(-c / lc - lam * math.log(_sig(odds)))
    torch.testing.assert_close(log_or, torch.tensor(expected_or, dtype=torch.float64))
    torch.testing.assert_close(losses, torch.tensor(expected_loss, dtype=torch.float64))
    torch.testing.assert_close(nll, -chosen / len_c)


def test_orpo_is_finite_at_extreme_likelihoods_and_validates():
    chosen = torch.tensor([-1e-6, -500.0])
    rejected = torch.tensor([-800.0, -1e-7])
    ones = torch.ones(2)
    losses, log_or, _ = orpo_loss(chosen, rejected, ones, ones)
    assert torch.isfinite(losses).all() and torch.isfinite(log_or).all()
    # log odds = a - log(1 - e^a): about a for a -> -inf, about -log(-a) for a -> 0-.
    assert log_or[0].item() == pytest.approx(-math.log(1e-6) + 800.0, rel=1e-4)
    with pytest.raises(ValueError, match="lambda_or"):
        orpo_loss(chosen, rejected, ones, ones, lambda_or=0.0)
    with pytest.raises(ValueError, match="positive"):
        orpo_loss(chosen, rejected, ones * 0, ones)


@pytest.fixture
def one_thread():
    # Tensors of a few thousand numbers: threads only contend (tens of times slower on a busy
    # 2-core runner). Restore the setting for the other tests.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_online_dpo_finds_a_response_missing_from_the_offline_data(one_thread):
    pi_ref = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.08, 0.02])
    reward = torch.tensor([0.0, 1.0, -0.5, 1.5, 0.5, 3.0])
    behaviour = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1, 0.0])  # never shows response 5
    w, lo = bandit.sample_preferences(reward, 500, pi_ref=behaviour, seed=0)
    target = bandit.optimal_policy(pi_ref, reward, 1.0)
    pi, hist = bandit.online_dpo(pi_ref, reward, 1.0, rounds=3, pairs_per_round=200, steps=300,
                                 lr=3.0, winners=w, losers=lo, seed=0)
    offline = hist[0]["pi"]
    assert not hist[0]["seen"][5] and hist[-1]["seen"][5]
    assert offline[5] < pi_ref[5] < 0.5 * target[5] < pi[5]
    assert bandit.kl(pi, target) < bandit.kl(offline, target) / 10
    assert hist[-1]["n_pairs"] == 500 + 3 * 200
    again, _ = bandit.online_dpo(pi_ref, reward, 1.0, rounds=3, pairs_per_round=200, steps=300,
                                 lr=3.0, winners=w, losers=lo, seed=0)
    torch.testing.assert_close(pi, again)
