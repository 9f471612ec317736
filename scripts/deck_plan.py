"""What the notebooks cannot say about their lecture: the per-deck data that build_slides.py adds.

Each lecture (keyed by its notebook's number) has a motivating example, the key equations for its
recap, a summary, its references, and the cells whose code is the point of the lecture, named by
a pattern their source matches (cells move; a pattern follows the cell); a cell too long for a
slide shows the lines from the one the pattern matches. `home_goal` is the
lecture's goal for the site's home table, with its maths in TeX so that MathJax typesets it.
A notebook without an entry still gets a deck: title, outline, body and the paper's reference.
"""

PAPER = {
    "title": "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
    "authors": "Rafael Rafailov, Archit Sharma, Eric Mitchell, Stefano Ermon, "
               "Christopher D. Manning, Chelsea Finn",
    "venue": "NeurIPS 2023",
    "arxiv": "2305.18290",
}
REPOSITORY = "https://github.com/dpo-course/dpo-course"

REFERENCES = {
    "dpo": "Rafailov, Sharma, Mitchell, Ermon, Manning and Finn (2023). *Direct Preference "
           "Optimization: Your Language Model is Secretly a Reward Model*. NeurIPS 2023, "
           "arXiv 2305.18290.",
    "instructgpt": "Ouyang et al. (2022). *Training language models to follow instructions with "
                   "human feedback* (InstructGPT). arXiv 2203.02155.",
    "bt": "Bradley and Terry (1952). *Rank analysis of incomplete block designs: I. The method "
          "of paired comparisons*. Biometrika 39.",
    "ipo": "Azar et al. (2023). *A General Theoretical Paradigm to Understand Learning from "
           "Human Preferences* (IPO). arXiv 2310.12036.",
    "kto": "Ethayarajh et al. (2024). *KTO: Model Alignment as Prospect Theoretic "
           "Optimization*. arXiv 2402.01306.",
    "orpo": "Hong et al. (2024). *ORPO: Monolithic Preference Optimization without Reference "
            "Model*. arXiv 2403.07691.",
    "simpo": "Meng et al. (2024). *SimPO: Simple Preference Optimization with a Reference-Free "
             "Reward*. arXiv 2405.14734.",
    "rdpo": "Chowdhury et al. (2024). *Provably Robust DPO: Aligning Language Models with Noisy "
            "Feedback*. arXiv 2403.00409.",
    "slic": "Zhao et al. (2023). *SLiC-HF: Sequence Likelihood Calibration with Human "
            "Feedback*. arXiv 2305.10425.",
    "cdpo": "Mitchell (2023). *A note on DPO with noisy preferences* (cDPO).",
    "lora": "Hu et al. (2021). *LoRA: Low-Rank Adaptation of Large Language Models*. "
            "arXiv 2106.09685.",
    "trl": "Hugging Face TRL documentation: `SFTTrainer` and `DPOTrainer`.",
    "displacement": "Razin et al. (2024). *Unintentional Unalignment: Likelihood Displacement "
                    "in Direct Preference Optimization*. arXiv 2410.08847.",
}

EQ1 = (r"p^*(y_1 \succ y_2 \mid x) = \frac{\exp r^*(x, y_1)}"
       r"{\exp r^*(x, y_1) + \exp r^*(x, y_2)} = \sigma\big(r^*(x, y_1) - r^*(x, y_2)\big)")
EQ2 = (r"\mathcal{L}_R(r_\phi, \mathcal{D}) = -\mathbb{E}_{(x, y_w, y_l)}"
       r"\big[\log \sigma\big(r_\phi(x, y_w) - r_\phi(x, y_l)\big)\big]")
EQ3 = (r"\max_{\pi_\theta}\ \mathbb{E}_{x, y \sim \pi_\theta}\big[r_\phi(x, y)\big]"
       r" - \beta\,\mathbb{D}_{\mathrm{KL}}\big[\pi_\theta(y \mid x) \,\|\, "
       r"\pi_{\mathrm{ref}}(y \mid x)\big]")
EQ4 = (r"\pi^*(y \mid x) = \frac{1}{Z(x)}\,\pi_{\mathrm{ref}}(y \mid x)\,"
       r"\exp\Big(\frac{1}{\beta} r(x, y)\Big)")
EQ5 = (r"r(x, y) = \beta \log \frac{\pi^*(y \mid x)}{\pi_{\mathrm{ref}}(y \mid x)}"
       r" + \beta \log Z(x)")
EQ7 = (r"\mathcal{L}_{\mathrm{DPO}} = -\mathbb{E}\Big[\log \sigma\Big(\beta \log "
       r"\frac{\pi_\theta(y_w \mid x)}{\pi_{\mathrm{ref}}(y_w \mid x)} - \beta \log "
       r"\frac{\pi_\theta(y_l \mid x)}{\pi_{\mathrm{ref}}(y_l \mid x)}\Big)\Big]")
GRAD = (r"\nabla_\theta \mathcal{L}_{\mathrm{DPO}} = -\beta\,\mathbb{E}\big[\sigma(\hat r_l - "
        r"\hat r_w)\,\big(\nabla_\theta \log \pi_\theta(y_w \mid x) - \nabla_\theta \log "
        r"\pi_\theta(y_l \mid x)\big)\big]")
RHAT = r"\hat r = \beta \log \frac{\pi_\theta(y \mid x)}{\pi_{\mathrm{ref}}(y \mid x)}"
LN2 = r"\pi_\theta = \pi_{\mathrm{ref}} \ \Rightarrow\ \mathcal{L}_{\mathrm{DPO}} = \ln 2"
LORA = r"W = W_0 + \frac{\alpha}{r} B A, \qquad B \in \mathbb{R}^{d \times r},\ " \
       r"A \in \mathbb{R}^{r \times k},\ B_0 = 0"

LECTURES = {
    "01": {
        "motivation": [
            "A user asks: *What is the capital of Australia?* One model answers *Canberra.*, "
            "another *Sydney, the largest city.* Both are fluent.",
            "A labeller finds it easy to say which answer is **better**, and hard to give "
            "either a score out of 10.",
            "How do we turn many such choices into a training signal for a language model?",
        ],
        "recap": [("Eq 1, Bradley–Terry", EQ1), ("Eq 2, reward-model loss", EQ2),
                  ("Eq 3, RLHF objective", EQ3)],
        "summary": [
            "Preferences are pairs $(x, y_w, y_l)$: comparing is easier and more consistent "
            "than scoring.",
            "RLHF: supervised fine-tuning, a reward model, then RL with a KL penalty; four "
            "networks in memory and a sampling loop.",
            "Bradley–Terry turns reward differences into probabilities: "
            "$\\sigma(r_1 - r_2)$.",
            "The reward-model loss (Eq 2) is logistic regression on the reward difference; "
            "rewards are defined only up to a shift $c(x)$.",
        ],
        "references": ["dpo", "bt", "instructgpt"],
        "code": [r"def nll_by_hand\("],
        "home_goal": "Preference pairs $(x, y_w, y_l)$, the RLHF pipeline and its drawbacks; "
                     "Bradley–Terry $= \\sigma(r_w - r_l)$ and the reward-model loss (Eq 2) in "
                     "SymPy; fit BT scores to simulated comparisons",
    },
    "02": {
        "motivation": [
            "RLHF trains a reward model, then runs reinforcement learning against it: two "
            "stages, sampling in the loop, four networks in memory.",
            "Yet the RL objective (Eq 3) has an **exact** maximiser. If we can write the best "
            "policy in closed form, can we skip the RL loop altogether?",
        ],
        "recap": [("Eq 3, the objective", EQ3), ("Eq 4, its maximiser", EQ4),
                  ("Eq 5, the reparameterised reward", EQ5), ("Eq 7, the DPO loss", EQ7)],
        "summary": [
            "The KL-regularised objective has the closed-form maximiser "
            "$\\pi^* \\propto \\pi_{\\mathrm{ref}} \\exp(r/\\beta)$ (Eq 4).",
            "A larger $\\beta$ keeps $\\pi^*$ closer to the reference; $\\beta \\to 0$ picks "
            "the best response.",
            "$Z(x)$ sums over every possible answer: intractable for a language model.",
            "Written as a reward (Eq 5), $Z(x)$ cancels in Bradley–Terry, which leaves the "
            "DPO loss (Eq 7): a classification loss on the policy itself.",
        ],
        "references": ["dpo", "instructgpt", "bt"],
        "code": [],
        "home_goal": "Derive $\\pi^* \\propto \\pi_{\\mathrm{ref}} \\exp(r/\\beta)$ (Lagrangian "
                     "and Gibbs routes) in SymPy, check it against L-BFGS, settle which way "
                     "$\\beta$ works, and follow Eq 5 → $Z$ cancels → the DPO loss (Eq 7)",
    },
    "03": {
        "motivation": [
            "Two training runs on the same pairs: one with the DPO loss, one with a "
            "plain \"raise the chosen, lower the rejected\" loss.",
            "Both separate chosen from rejected answers. Only one keeps a sensible policy. "
            "What in the DPO gradient makes the difference?",
        ],
        "recap": [("Eq 7, the DPO loss", EQ7), ("The implicit reward", RHAT),
                  ("The gradient (Section 4)", GRAD)],
        "summary": [
            "The DPO gradient raises $\\log\\pi_\\theta(y_w)$ and lowers "
            "$\\log\\pi_\\theta(y_l)$, weighted by $\\sigma(\\hat r_l - \\hat r_w)$.",
            "The weight is large on pairs the policy still ranks wrongly, small on pairs it "
            "already ranks right.",
            "Autograd on `dpo_loss` agrees with the derived formula.",
            "Without the weight the policy degenerates: probabilities collapse and "
            "log-likelihoods fall without bound.",
        ],
        "references": ["dpo", "slic"],
        "code": [r"def gradient_weight\("],
        "home_goal": "Derive the DPO gradient and its weight $\\sigma(\\hat r_l - \\hat r_w)$ "
                     "in SymPy, check it with autograd, and show on a bandit and a tiny GPT-2 "
                     "that without the weight the policy degenerates",
    },
    "04": {
        "motivation": [
            "You have a pretrained model and a file of preference pairs, and one GPU.",
            "What exactly does one DPO step compute, where does the reference model come "
            "from without a second copy, and how do you know, before training, that the "
            "loss is wired correctly?",
        ],
        "recap": [("Eq 7, the DPO loss", EQ7), ("The check at step 0", LN2),
                  ("LoRA", LORA)],
        "summary": [
            "Log-probabilities: shift by one, gather the label tokens, mask the prompt and "
            "padding, sum over the response.",
            "LoRA trains a few parameters, and the reference is the same network with the "
            "adapter switched off.",
            "Every run starts with the check: loss $= \\ln 2$ and margins $= 0$ at step 0.",
            "Judge training by held-out metrics and by what the model writes, not only by "
            "the training loss.",
        ],
        "references": ["dpo", "lora", "trl"],
        "code": [r"def my_sequence_logps\(", r"def my_dpo_loss\(", r"^for step in range\("],
        "home_goal": None,
    },
    "05": {
        "motivation": [
            "phi-2 has 2.78 billion parameters, and a Colab T4 has 16 GB.",
            "Before downloading 5.6 GB of weights: will a DPO run fit, in which precision, "
            "and what happens when the session disconnects halfway?",
        ],
        "recap": [("Eq 7, the DPO loss", EQ7), ("LoRA", LORA), ("The check at step 0", LN2)],
        "summary": [
            "Plan memory before loading: weights, adapters and optimiser, activations, "
            "logits.",
            "fp16 with a grad scaler on a T4, bf16 on Ampere or newer; `sdpa` attention for "
            "phi-2 in fp16.",
            "Gradient checkpointing trades compute for most of the activation memory.",
            "Checkpoints make a long run survive a disconnect; a resumed run equals the "
            "uninterrupted one.",
        ],
        "references": ["dpo", "lora", "trl"],
        "code": [],
        "home_goal": None,
    },
    "06": {
        "motivation": [
            "Since 2023 DPO has had many successors: IPO, cDPO, robust DPO, SimPO, KTO, "
            "ORPO.",
            "Each one fixes a weakness. Which weaknesses, and do they show up on a problem "
            "small enough to solve exactly?",
        ],
        "recap": [
            ("Eq 7, DPO", r"\ell = -\log\sigma(\beta h)"),
            ("cDPO", r"\ell = -(1-\varepsilon)\log\sigma(\beta h) - "
                     r"\varepsilon\log\sigma(-\beta h)"),
            ("IPO", r"\ell = \Big(h - \frac{1}{2\beta}\Big)^2"),
            ("hinge", r"\ell = \max(0,\ 1 - \beta h)"),
            ("The margin", r"h = \log\frac{\pi_\theta(y_w)}{\pi_{\mathrm{ref}}(y_w)} - "
                           r"\log\frac{\pi_\theta(y_l)}{\pi_{\mathrm{ref}}(y_l)}"),
        ],
        "summary": [
            "The zoo differs in how each loss weighs a pair as its margin grows.",
            "On a bandit, DPO and RLHF reach the same $\\pi^*$ and share one reward–KL "
            "frontier.",
            "With deterministic preferences DPO's margin grows without bound; IPO's does "
            "not.",
            "Offline, DPO cannot find a response its data never shows; an on-policy method "
            "can.",
        ],
        "references": ["dpo", "ipo", "cdpo", "rdpo", "slic", "simpo", "kto", "orpo"],
        "code": [],
        "home_goal": None,
    },
    "07": {
        "motivation": [
            "Most DPO models you can download were trained the same way: supervised "
            "fine-tuning first, then DPO with TRL.",
            "If you run that recipe and our library on the same data, do you get the same "
            "loss curve, and what has to be aligned for that?",
        ],
        "recap": [("Eq 7, the DPO loss", EQ7), ("The check at step 0", LN2)],
        "summary": [
            "SFT on demonstrations first: the SFT model is also the reference "
            "$\\pi_{\\mathrm{ref}}$.",
            "Set every `DPOConfig` argument on purpose; TRL's defaults differ from ours.",
            "With the same data order, truncation and precision, TRL and `dpo_minimal` give "
            "the same loss curve.",
        ],
        "references": ["dpo", "trl", "lora"],
        "code": [],
        "home_goal": None,
    },
    "08": {
        "motivation": [
            "A real instruct model, SmolLM2-135M-Instruct, trains with LoRA DPO on a laptop "
            "CPU.",
            "Trained on pairs another model wrote, it gets worse while its loss falls: why, "
            "and what data makes it better?",
        ],
        "recap": [("Eq 7, the DPO loss", EQ7), ("Eq 5, the implicit reward", EQ5)],
        "summary": [
            "Render the pairs with the model's own chat template.",
            "Off-policy pairs: chosen and rejected log-probabilities both fall (likelihood "
            "displacement), and held-out answers get worse.",
            "On-policy pairs (the model's own answers, judged) make the same training raise "
            "the true reward.",
            "The implicit reward $\\beta \\log \\pi_\\theta/\\pi_{\\mathrm{ref}}$ ranks new "
            "answers as the true reward does, most of the time.",
        ],
        "references": ["dpo", "displacement", "lora"],
        "code": [],
        "home_goal": None,
    },
}
