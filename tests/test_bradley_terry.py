"""Bradley-Terry pieces notebook 01 relies on that tests/test_bandit.py does not cover directly:
bt_nll is Eq 2 (value, stability, gradient) and only reward differences matter."""

import math

import torch

from dpo_minimal.course import bandit

SCORES = torch.tensor([0.5, -1.0, 2.0, 0.0])
WINNERS = torch.tensor([0, 2, 1, 2, 3])
LOSERS = torch.tensor([1, 3, 3, 0, 2])


def test_bt_nll_is_eq2_written_out():
    # -1/N sum_i log( e^{r_w} / (e^{r_w} + e^{r_l}) ), term by term with math.exp
    expected = -sum(
        math.log(math.exp(SCORES[w]) / (math.exp(SCORES[w]) + math.exp(SCORES[lo])))
        for w, lo in zip(WINNERS.tolist(), LOSERS.tolist())
    ) / len(WINNERS)
    assert abs(bandit.bt_nll(SCORES, WINNERS, LOSERS).item() - expected) < 1e-6


def test_bt_nll_gradient_is_minus_sigma_of_reversed_margin():
    scores = SCORES.clone().requires_grad_(True)
    bandit.bt_nll(scores, WINNERS, LOSERS).backward()
    expected = torch.zeros(4)
    for w, lo in zip(WINNERS.tolist(), LOSERS.tolist()):
        weight = 1 / (1 + math.exp(SCORES[w] - SCORES[lo])) / len(WINNERS)  # sigma(r_l - r_w)/N
        expected[w] -= weight
        expected[lo] += weight
    torch.testing.assert_close(scores.grad, expected)
    assert abs(scores.grad.sum()) < 1e-7  # a shift of all scores does not change the loss


def test_bt_nll_is_finite_for_huge_margins():
    scores = torch.tensor([0.0, 200.0])
    wrong = bandit.bt_nll(scores, torch.tensor([0]), torch.tensor([1]))
    right = bandit.bt_nll(scores, torch.tensor([1]), torch.tensor([0]))
    assert wrong.item() == 200.0  # -log sigma(-200) = 200 + log(1 + e^-200)
    assert right.item() == 0.0


def test_a_shift_changes_neither_loss_nor_sampled_preferences():
    shifted = SCORES + 4.0  # exact in float32 for these scores, so margins are bit-identical
    assert abs(bandit.bt_nll(shifted, WINNERS, LOSERS)
               - bandit.bt_nll(SCORES, WINNERS, LOSERS)) < 1e-6
    # Scaling is not a symmetry: it changes every margin, hence the loss.
    assert abs(bandit.bt_nll(2 * SCORES, WINNERS, LOSERS)
               - bandit.bt_nll(SCORES, WINNERS, LOSERS)) > 1e-2
    w, lo = bandit.sample_preferences(SCORES, 3000, seed=0)
    w_s, lo_s = bandit.sample_preferences(shifted, 3000, seed=0)
    assert torch.equal(w, w_s) and torch.equal(lo, lo_s)  # same probabilities, same draws
