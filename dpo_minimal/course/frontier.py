"""The reward-KL frontier in miniature: the DPO paper's Figure 2 on the task world, on a CPU.

Rafailov et al. 2023 (arXiv 2305.18290, Sec. 6.1, Fig. 2 left) plot, for IMDb sentiment, the
expected reward of each policy against its KL(pi || pi_ref): a method is better when it gets more
reward for the same KL budget. Here is the same plot, with the task world's true reward, for:

- DPO at several beta (LoRA on the pretrained tiny GPT-2, `dpo_minimal.train`);
- Preferred-FT: LoRA fine-tuning with plain NLL on the chosen responses only (`train` with
  loss_type "sft");
- Best-of-N: draw N responses from the reference, keep one with the highest true reward;
- pi*: the exact optimum of the KL-regularised objective (Eq 3), pi* ~ pi_ref exp(r / beta)
  (Eq 4): the frontier itself, which no policy can beat (up to sampling noise).

How each point is measured, on the held-out prompts (task_heldout.jsonl):

- A trained policy: n responses per prompt sampled at temperature 1 (pure sampling, so they are
  draws from pi). Reward: their mean true reward. KL: the mean over the same samples of
  log pi(y|x) - log pi_ref(y|x), summed over the response tokens and the EOS: the Monte Carlo
  estimate of E_x KL(pi(.|x) || pi_ref(.|x)), unbiased, though single terms can be negative.
  A response cut at max_new_tokens counts as its prefix.
- Best-of-N and pi* need no training. Both only reweight the reference by reward, and the true
  reward takes a few values, so pi(y) = pi_ref(y) q(r(y)) / p(r(y)), where p is the reference's
  distribution over reward values and q the new one. Then E[r] = sum_r q_r r and
  KL = sum_r q_r log(q_r / p_r), exactly. Best-of-N: q_r = F(r)^N - F(r-)^N with F the CDF of
  p (ties broken at random); pi*: q_r ~ p_r exp(r / beta). p is estimated per prompt from
  `reference_samples` draws: a plug-in estimate, in which a value the reference never showed
  gets no mass.
"""

import json
import time
from dataclasses import dataclass, replace

import torch

from ..data import DATA_DIR, collate_unpaired, load_preferences
from ..logprobs import batch_logps
from ..models import add_lora, tiny_model
from ..objective import Reference
from ..train import TrainConfig, train
from . import task


@dataclass(frozen=True)
class FrontierConfig:
    """The sizes of a frontier run (see SIZES for smoke and full)."""

    betas: tuple = (0.3, 1.0, 3.0, 10.0)  # DPO runs
    best_of: tuple = (2, 4, 8, 16)
    optimal_betas: tuple = (float("inf"), 3.0, 1.0, 0.5, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05,
                            0.03)  # the pi* curve; beta = inf is the reference itself
    steps: int = 100  # optimiser steps of each DPO and Preferred-FT run (150 overfits beta=0.3)
    batch_size: int = 8
    learning_rate: float = 1e-3
    lora_r: int = 8
    n_samples: int = 4  # per held-out prompt, for each trained policy
    reference_samples: int = 16  # per held-out prompt, for the reference, Best-of-N and pi*
    prompts: str = "heldout"  # "heldout": task_heldout.jsonl; "train": the pairs' own prompts
    n_prompts: int | None = None  # None: all of them (46 held-out, 138 train)
    max_new_tokens: int = 48
    max_length: int = 72
    max_prompt_length: int = 32
    seed: int = 0


SIZES = {
    "smoke": FrontierConfig(),
    "full": FrontierConfig(betas=(0.3, 0.5, 1.0, 3.0, 10.0, 30.0), steps=400,
                           learning_rate=5e-4, n_samples=16, reference_samples=64),
}


@torch.no_grad()
def log_ratios(model, tokenizer, rows: list[dict]) -> torch.Tensor:
    """(P, n) log pi(y|x) - log pi_ref(y|x) of `task.sample`'s responses, summed over tokens.

    pi is the peft model, pi_ref the same model with its adapter disabled. Their mean over
    responses sampled from pi estimates KL(pi || pi_ref) (see the module docstring).
    """
    model.eval()
    out = []
    with torch.no_grad():
        for row in rows:
            batch = collate_unpaired([{"prompt_ids": row["prompt_ids"], "completion_ids": y,
                                       "label": True} for y in row["response_ids"]],
                                     tokenizer.pad_token_id)
            out.append(batch_logps(model, batch) - Reference().logps(model, batch))
    return torch.stack(out)


def _levels(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values ascending, their empirical probabilities) of one prompt's reward samples."""
    values, counts = torch.unique(rewards.double(), return_counts=True)
    return values, counts.double() / counts.sum()


def _reweighted(reference_rewards: torch.Tensor, new_mass) -> tuple[float, float]:
    """Mean over prompts of (E_q[r], KL(q || p)) for q = new_mass(values, p), per prompt."""
    rewards, kls = [], []
    for row in reference_rewards:
        values, p = _levels(row)
        q = new_mass(values, p)
        kept = q > 0
        rewards.append(float((q * values).sum()))
        kls.append(float((q[kept] * (q[kept] / p[kept]).log()).sum()))
    return sum(rewards) / len(rewards), sum(kls) / len(kls)


def best_of_n(reference_rewards: torch.Tensor, n: int) -> tuple[float, float]:
    """(expected reward, KL to the reference) of Best-of-n, from (P, M) reference rewards.

    q_r = F(r)^n - F(r-)^n: the chance that the best of n draws has reward r.
    """
    def mass(values, p):
        cdf = p.cumsum(0).clamp(max=1.0)
        return cdf ** n - (cdf - p).clamp(min=0.0) ** n

    return _reweighted(reference_rewards, mass)


def optimal(reference_rewards: torch.Tensor, beta: float) -> tuple[float, float]:
    """(expected reward, KL) of pi* ~ pi_ref exp(r / beta) (Eq 4), from (P, M) reference rewards."""
    return _reweighted(reference_rewards,
                       lambda values, p: torch.softmax(p.log() + values / beta, dim=0))


def _point(method: str, setting: str, rewards: torch.Tensor, kls, seconds: float) -> dict:
    """A table row; standard errors from the spread of the per-prompt means."""
    per_prompt = rewards.mean(1)
    se = lambda x: float(x.std() / len(x) ** 0.5) if len(x) > 1 else float("nan")  # noqa: E731
    row = {"method": method, "setting": setting, "reward": float(rewards.mean()),
           "reward_se": se(per_prompt), "kl": 0.0, "kl_se": 0.0, "seconds": round(seconds, 1)}
    if kls is not None:
        row.update(kl=float(kls.mean()), kl_se=se(kls.mean(1)))
    return row


def evaluation_prompts(which: str = "heldout") -> list[str]:
    """The prompts a frontier is measured on, in a fixed order.

    "heldout": one per held-out fact (in no training pair), which measures what DPO learnt
    that carries over to new questions; "train": each distinct prompt of the training pairs,
    the prompt distribution of the objective DPO optimises (Eq 3).
    """
    if which == "heldout":
        lines = (DATA_DIR / "task_heldout.jsonl").read_text().splitlines()
        return [json.loads(line)["prompt"] for line in lines]
    if which == "train":
        lines = (DATA_DIR / "task_prefs_train.jsonl").read_text().splitlines()
        return sorted({json.loads(line)["prompt"] for line in lines})
    raise ValueError(f"unknown prompt set {which!r}: use 'heldout' or 'train'.")


def frontier(config: FrontierConfig | str = "smoke", progress: bool = False) -> list[dict]:
    """Every point of the frontier: rows of method, setting, reward, kl (+ standard errors).

    `config` is a FrontierConfig or a SIZES key ("smoke": about a minute or two on 2 CPU cores).
    Methods: reference, Best-of-N, pi* (both computed from the reference samples), DPO at each
    beta and Preferred-FT (each a fresh LoRA on the pretrained model, trained for config.steps
    on task_prefs_train.jsonl with the same lr and batch). KL is in nats per response.
    """
    cfg = SIZES[config] if isinstance(config, str) else config
    data = load_preferences(DATA_DIR / "task_prefs_train.jsonl")
    prompts = evaluation_prompts(cfg.prompts)[: cfg.n_prompts]
    say = print if progress else (lambda *args: None)

    start = time.perf_counter()
    base, tokenizer = tiny_model("gpt2", pretrained=True)
    reference = task.score(task.sample(base, tokenizer, prompts, cfg.reference_samples,
                                       max_new_tokens=cfg.max_new_tokens, seed=cfg.seed))
    rows = [_point("reference", "", reference, None, time.perf_counter() - start)]
    for n in cfg.best_of:
        value, kl = best_of_n(reference, n)
        rows.append({**rows[0], "method": "Best-of-N", "setting": f"N={n}", "reward": value,
                     "reward_se": float("nan"), "kl": kl, "kl_se": float("nan"), "seconds": 0.0})
    for beta in cfg.optimal_betas:
        value, kl = optimal(reference, beta)
        rows.append({**rows[0], "method": "pi*", "setting": f"beta={beta:g}", "reward": value,
                     "reward_se": float("nan"), "kl": kl, "kl_se": float("nan"), "seconds": 0.0})
    say(f"reference and analytic points: {time.perf_counter() - start:.0f} s")

    runs = [("DPO", beta) for beta in cfg.betas] + [("Preferred-FT", None)]
    for method, beta in runs:
        start = time.perf_counter()
        torch.manual_seed(cfg.seed)  # LoRA's A is random: each run starts the same
        model = add_lora(tiny_model("gpt2", pretrained=True)[0], r=cfg.lora_r, alpha=2 * cfg.lora_r)
        train_config = TrainConfig(
            beta=beta or 0.1, learning_rate=cfg.learning_rate, batch_size=cfg.batch_size,
            max_steps=cfg.steps, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
            seed=cfg.seed, progress=False)
        # Preferred-FT is the loss "sft": the chosen responses' likelihood, through the same loop.
        train(model, tokenizer, data,
              train_config if method == "DPO" else replace(train_config, loss_type="sft"))
        samples = task.sample(model, tokenizer, prompts, cfg.n_samples,
                              max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        setting = f"beta={beta:g}" if beta else f"{cfg.steps} steps"
        rows.append(_point(method, setting, task.score(samples),
                           log_ratios(model, tokenizer, samples), time.perf_counter() - start))
        say(f"{method} {setting}: reward {rows[-1]['reward']:.3f}, KL {rows[-1]['kl']:.2f} "
            f"({rows[-1]['seconds']:.0f} s)")
    return rows


def optimal_reward_at(rows: list[dict], kl: float) -> float:
    """The pi* curve's reward at `kl` (linear between its points; its last value beyond them).

    No policy gets more reward for the same KL (up to sampling noise), so
    `row["reward"] <= optimal_reward_at(rows, row["kl"]) + noise` for every trained row.
    """
    points = sorted((r["kl"], r["reward"]) for r in rows if r["method"] == "pi*")
    if not points:
        raise ValueError("no pi* rows: compute them with frontier() (config.optimal_betas).")
    if kl <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if kl <= x1:
            return y0 + (y1 - y0) * (kl - x0) / (x1 - x0)
    return points[-1][1]


def plot_frontier(rows: list[dict], ax=None, title: str = "Reward-KL frontier on the task world"):
    """Mean true reward against KL(pi || pi_ref), one marker style per method; returns the axes.

    pi* is drawn as a line (the exact frontier), Best-of-N as a dotted line through its N,
    DPO points are labelled with beta; error bars are one standard error.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        ax = plt.subplots(figsize=(7, 4.5))[1]
    styles = {
        "pi*": dict(color="black", ls="--", marker="", label=r"$\pi^*$ (Eq 4): the optimum"),
        "Best-of-N": dict(color="tab:green", ls=":", marker="s", label="Best-of-N"),
        "DPO": dict(color="tab:blue", ls="", marker="o", label="DPO"),
        "Preferred-FT": dict(color="tab:orange", ls="", marker="^", label="Preferred-FT"),
        "reference": dict(color="grey", ls="", marker="*", ms=12, label="reference (SFT)"),
    }
    for method, style in styles.items():
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["kl"])
        if not points:
            continue
        x = [r["kl"] for r in points]
        y = [r["reward"] for r in points]
        if method in ("DPO", "Preferred-FT"):
            ax.errorbar(x, y, xerr=[r["kl_se"] for r in points],
                        yerr=[r["reward_se"] for r in points], capsize=2, **style)
        else:
            ax.plot(x, y, **style)
        for r in points if method in ("DPO", "Best-of-N") else ():
            label = r["setting"].replace("beta=", r"$\beta$=")
            ax.annotate(label, (r["kl"], r["reward"]), fontsize=7,
                        textcoords="offset points", xytext=(4, -10))
    ax.set(title=title, xlabel=r"KL($\pi\,\|\,\pi_{ref}$) (nats per response)",
           ylabel="mean true reward (0 to 1)")
    ax.legend(fontsize=8, loc="upper right")
    return ax
