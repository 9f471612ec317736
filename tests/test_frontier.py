"""The reward-KL frontier: the analytic points, the KL estimator, Preferred-FT, a tiny run."""

import math

import pytest
import torch

from dpo_minimal import load_preferences
from dpo_minimal.course import frontier, task
from dpo_minimal.data import DATA_DIR
from dpo_minimal.train import TrainConfig, train

REWARDS = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1 / 3, 1 / 3, 1 / 3, 1.0]])


def test_best_of_n_by_hand():
    value, kl = frontier.best_of_n(REWARDS[:1], 2)  # P(best of 2 is 1) = 1 - 0.5^2
    assert value == pytest.approx(0.75)
    assert kl == pytest.approx(0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5))
    assert frontier.best_of_n(REWARDS, 1) == pytest.approx((float(REWARDS.mean()), 0.0))
    # KL of Best-of-N never exceeds the bound log N - (N - 1) / N (Beirami et al. 2024).
    for n in (2, 4, 16):
        assert frontier.best_of_n(REWARDS, n)[1] <= math.log(n) - (n - 1) / n + 1e-9


def test_optimal_policy_limits_and_optimality():
    assert frontier.optimal(REWARDS, 1e6) == pytest.approx((float(REWARDS.mean()), 0.0), abs=1e-6)
    value, kl = frontier.optimal(REWARDS, 1e-4)  # all mass on each prompt's best response
    assert value == pytest.approx(1.0)
    assert kl == pytest.approx((math.log(2) + math.log(4)) / 2)
    # pi* maximises E[r] - beta KL (Eq 3) over all reweightings, Best-of-N included.
    for beta in (0.05, 0.2, 1.0):
        best = frontier.optimal(REWARDS, beta)
        for n in (2, 3, 8):
            other = frontier.best_of_n(REWARDS, n)
            assert best[0] - beta * best[1] >= other[0] - beta * other[1] - 1e-9


def test_optimal_reward_at_interpolates_the_pi_star_curve():
    rows = [{"method": "pi*", "kl": 0.0, "reward": 0.5},
            {"method": "pi*", "kl": 1.0, "reward": 0.9},
            {"method": "DPO", "kl": 0.5, "reward": 2.0}]
    assert frontier.optimal_reward_at(rows, 0.25) == pytest.approx(0.6)
    assert frontier.optimal_reward_at(rows, 3.0) == 0.9
    assert frontier.optimal(REWARDS, float("inf")) == pytest.approx((float(REWARDS.mean()), 0.0))
    with pytest.raises(ValueError, match="no pi"):
        frontier.optimal_reward_at(rows[2:], 0.1)


@pytest.fixture(scope="module")
def data():
    return load_preferences(DATA_DIR / "task_prefs_train.jsonl").select(range(16))


def test_log_ratios_zero_for_a_fresh_adapter_and_positive_on_average(tiny_lora):
    prompts = [task.render(f.question) for f in task.facts()[::90]]
    model, tok = tiny_lora(pretrained=True, alpha=32)
    rows = task.sample(model, tok, prompts, n_samples=3, max_new_tokens=12, seed=0)
    assert torch.equal(frontier.log_ratios(model, tok, rows), torch.zeros(len(prompts), 3))
    torch.manual_seed(0)
    with torch.no_grad():  # the adapter moved away from the reference
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    rows = task.sample(model, tok, prompts, n_samples=4, max_new_tokens=12, seed=0)
    ratios = frontier.log_ratios(model, tok, rows)
    assert ratios.shape == (len(prompts), 4) and ratios.mean() > 1.0  # a KL estimate, nats


def test_preferred_ft_is_the_sft_loss_it_lowers_nll_and_ignores_the_rejected(data, tiny_lora):
    config = TrainConfig(loss_type="sft", learning_rate=3e-3, batch_size=4, max_steps=12,
                         max_length=72, max_prompt_length=32, progress=False)
    model, tok = tiny_lora(pretrained=True, alpha=32)
    history = train(model, tok, data, config)
    losses = [row["loss"] for row in history]
    # The loss is the chosen responses' NLL per token, and the log-probs logged agree with it.
    assert losses[0] == pytest.approx(-history[0]["rewards/chosen"], rel=1e-6)
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert history[-1]["logps/chosen"] > history[0]["logps/chosen"]
    swapped = data.map(lambda row: {"rejected": " Nothing at all."})
    again, _ = tiny_lora(pretrained=True, alpha=32)
    # Only the padding width changes, which moves a loss by float rounding at most.
    assert [row["loss"] for row in train(again, tok, swapped, config)] == pytest.approx(
        losses, rel=1e-5)


def test_tiny_frontier_run_has_every_method_and_plots():
    config = frontier.FrontierConfig(betas=(0.1,), best_of=(2,), optimal_betas=(1.0,), steps=2,
                                     n_samples=2, reference_samples=4, n_prompts=2,
                                     max_new_tokens=8)
    rows = frontier.frontier(config)
    assert [r["method"] for r in rows] == ["reference", "Best-of-N", "pi*", "DPO", "Preferred-FT"]
    assert rows[0]["kl"] == 0.0
    for row in rows:
        assert 0.0 <= row["reward"] <= 1.0 and math.isfinite(row["kl"])
    ax = frontier.plot_frontier(rows)
    assert ax.get_xlabel().startswith("KL") and ax.get_ylabel() and ax.get_title()
    assert {t.get_text() for t in ax.get_legend().get_texts()} >= {"DPO", "Preferred-FT"}
