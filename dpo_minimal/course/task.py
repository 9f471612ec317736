"""The task world: short questions a program judges exactly, and a style the judge also cares about.

Three kinds of question, each with one right answer and one *systematic slip*:

- capital: "What is the capital of Australia?"   right "Canberra", slip: its best-known city;
- plus:    "What is 3 plus 5?"                   right "8", slip: one too many;
- units:   "How many minutes are in 2 hours?"    right "120 minutes", slip: a wrong factor.

The answer is one sentence, "The capital of Australia is Canberra.", and then nothing: a response
that rambles on after it is worse. A demonstrator writes the SFT corpus: right half of the time
(the slip otherwise) and brief half of the time (one to three filler sentences otherwise), so a
model trained on it is right only part of the time. A preference pair is two of its answers
ranked by the judge, so pairs have something to teach.

`reward(prompt, response)` is the true reward (the judge); `judge` gives its parts. The data files
in dpo_minimal/data/task_*.jsonl come from the generators here (scripts/make_task_data.py).
"""

import random
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
P_RIGHT = 0.5  # the demonstrator gives the right answer with this probability, else its slip
P_BRIEF = 0.5  # ... and stops after the answer with this probability, else rambles on
HELDOUT_FRACTION = 0.25  # of each kind's facts: never in a preference pair

# country: (capital, the best-known city people confuse it with)
CAPITALS = {
    "Argentina": ("Buenos Aires", "Cordoba"), "Australia": ("Canberra", "Sydney"),
    "Austria": ("Vienna", "Salzburg"), "Brazil": ("Brasilia", "Rio de Janeiro"),
    "Canada": ("Ottawa", "Toronto"), "Chile": ("Santiago", "Valparaiso"),
    "China": ("Beijing", "Shanghai"), "Colombia": ("Bogota", "Medellin"),
    "Ecuador": ("Quito", "Guayaquil"), "Egypt": ("Cairo", "Alexandria"),
    "France": ("Paris", "Marseille"), "Germany": ("Berlin", "Munich"),
    "Ghana": ("Accra", "Kumasi"), "Greece": ("Athens", "Thessaloniki"),
    "Hungary": ("Budapest", "Debrecen"), "Iceland": ("Reykjavik", "Akureyri"),
    "India": ("New Delhi", "Mumbai"), "Ireland": ("Dublin", "Cork"),
    "Italy": ("Rome", "Milan"), "Japan": ("Tokyo", "Osaka"),
    "Kazakhstan": ("Astana", "Almaty"), "Kenya": ("Nairobi", "Mombasa"),
    "Morocco": ("Rabat", "Casablanca"), "New Zealand": ("Wellington", "Auckland"),
    "Nigeria": ("Abuja", "Lagos"), "Norway": ("Oslo", "Bergen"),
    "Pakistan": ("Islamabad", "Karachi"), "Peru": ("Lima", "Cusco"),
    "Poland": ("Warsaw", "Krakow"), "Portugal": ("Lisbon", "Porto"),
    "Russia": ("Moscow", "Saint Petersburg"), "Saudi Arabia": ("Riyadh", "Jeddah"),
    "South Africa": ("Pretoria", "Johannesburg"), "South Korea": ("Seoul", "Busan"),
    "Spain": ("Madrid", "Barcelona"), "Sweden": ("Stockholm", "Gothenburg"),
    "Switzerland": ("Bern", "Zurich"), "Tanzania": ("Dodoma", "Dar es Salaam"),
    "Turkey": ("Ankara", "Istanbul"), "Vietnam": ("Hanoi", "Ho Chi Minh City"),
}
# (unit, plural, smaller unit, factor, the factor of the slip)
UNITS = [
    ("hour", "hours", "minutes", 60, 100), ("minute", "minutes", "seconds", 60, 100),
    ("day", "days", "hours", 24, 12), ("week", "weeks", "days", 7, 5),
    ("year", "years", "months", 12, 10), ("metre", "metres", "centimetres", 100, 10),
    ("kilogram", "kilograms", "grams", 1000, 100),
]
DIGITS = range(1, 10)  # plus: both operands, and units: the amount
# Filler a rambling answer adds after its first sentence: no digits, no place names.
FILLERS = [
    "I hope this helps.", "Let me know if you have another question.", "Thank you for asking.",
    "That is easy to check.", "Many people ask this.", "I am quite sure about that.",
    "It is a good question.", "You can look it up in a book.", "I like questions like this.",
    "There is more to say about it.",
]


@dataclass(frozen=True)
class Fact:
    """One question of the world: its answer sentence is "{subject...} is {answer}."."""

    kind: str  # capital | plus | units
    question: str
    subject: str  # must appear in the answer's first sentence
    answer: str  # the right final words
    slip: str  # the demonstrator's systematic wrong final words
    lead: str  # the sentence up to " is {answer}."

    def sentence(self, right: bool = True) -> str:
        return f"{self.lead} is {self.answer if right else self.slip}."


def facts() -> list[Fact]:
    """Every fact of the world, in a fixed order: 40 capitals, 81 sums, 63 unit conversions."""
    out = [Fact("capital", f"What is the capital of {c}?", c, a, s, f"The capital of {c}")
           for c, (a, s) in CAPITALS.items()]
    out += [Fact("plus", f"What is {a} plus {b}?", f"{a} plus {b}", str(a + b), str(a + b + 1),
                 f"{a} plus {b}") for a in DIGITS for b in DIGITS]
    for unit, plural, small, factor, slip in UNITS:
        for n in DIGITS:
            amount = f"{n} {unit if n == 1 else plural}"
            out.append(Fact("units", f"How many {small} are in {amount}?", amount,
                            f"{n * factor} {small}", f"{n * slip} {small}", amount))
    return out


def render(question: str) -> str:
    """The prompt the model sees: PROMPT_TEMPLATE around a question."""
    return PROMPT_TEMPLATE.format(question=question)


def split_facts(seed: int = 0) -> tuple[list[Fact], list[Fact]]:
    """(train, held-out) facts: HELDOUT_FRACTION of each kind, drawn with `seed`, held out.

    Held-out facts are in the SFT corpus (the model learns them) but in no training preference
    pair, so a gain on them is DPO generalising, not DPO memorising its pairs.
    """
    rng = random.Random(seed)
    train, heldout = [], []
    for kind in ("capital", "plus", "units"):
        group = [f for f in facts() if f.kind == kind]
        chosen = set(rng.sample(range(len(group)), round(HELDOUT_FRACTION * len(group))))
        for i, fact in enumerate(group):
            (heldout if i in chosen else train).append(fact)
    return train, heldout


def response(fact: Fact, right: bool, ramble: int, rng: random.Random) -> str:
    """An answer in the demonstrator's voice: the sentence, then `ramble` filler sentences."""
    return " " + " ".join([fact.sentence(right)] + rng.sample(FILLERS, ramble))


def demonstrate(fact: Fact, rng: random.Random) -> str:
    """One answer of the demonstrator: right with probability P_RIGHT (its slip otherwise) and,
    independently, brief with probability P_BRIEF (one to three filler sentences otherwise)."""
    right = rng.random() < P_RIGHT
    ramble = 0 if rng.random() < P_BRIEF else rng.randint(1, 3)
    return response(fact, right, ramble, rng)


def sft_corpus(per_fact: int = 12, seed: int = 0) -> list[dict]:
    """The demonstrator's answers, `per_fact` to each question (prompt-completion rows).

    Every fact is in it, held-out ones included.
    """
    rng = random.Random(seed)
    rows = [{"kind": fact.kind, "prompt": render(fact.question),
             "completion": demonstrate(fact, rng)} for fact in facts() for _ in range(per_fact)]
    rng.shuffle(rows)
    return [{"id": f"sft-{i:04d}", **row} for i, row in enumerate(rows, 1)]


def preference_pairs(fact_list: list[Fact], n: int, seed: int = 0, prefix: str = "pair") -> list:
    """`n` pairs (prompt, chosen, rejected) on facts drawn from `fact_list`, seeded.

    As in the DPO paper's controlled experiments (Sec. 6.1): two answers are drawn from the
    policy that wrote the SFT corpus (the demonstrator) and labelled by the true reward; chosen
    is the better one, and a tie is drawn again. So chosen is better, not perfect: it is right
    only when one of the two was, and it may ramble. `pair_type` says where they differ:
    "slip" (one is right, the other gives the slip) or "rambling" (the same answer, and the
    rejected one rambles more).
    """
    rng = random.Random(seed)
    rows = []
    for i in range(1, n + 1):
        fact = rng.choice(fact_list)
        prompt = render(fact.question)
        a, b = demonstrate(fact, rng), demonstrate(fact, rng)
        while reward(prompt, a) == reward(prompt, b):
            a, b = demonstrate(fact, rng), demonstrate(fact, rng)
        chosen, rejected = (a, b) if reward(prompt, a) > reward(prompt, b) else (b, a)
        same = judge(prompt, chosen)["correct"] == judge(prompt, rejected)["correct"]
        rows.append({"id": f"{prefix}-{i:04d}", "kind": fact.kind,
                     "pair_type": "rambling" if same else "slip",
                     "prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def heldout_prompts(seed: int = 0) -> list[dict]:
    """One row (id, kind, prompt) per held-out fact, in the fixed order of facts()."""
    return [{"id": f"heldout-{i:03d}", "kind": f.kind, "prompt": render(f.question)}
            for i, f in enumerate(split_facts(seed)[1], 1)]


# ---- the judge -------------------------------------------------------------------------------

_FACTS = {f.question.lower(): f for f in facts()}
_SENTENCES = re.compile(r"[^.!?]*[.!?]|[^.!?]+$")


def fact_of(prompt: str) -> Fact:
    """The Fact a prompt asks about: a rendered prompt or the bare question (else ValueError)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}.")
    found = re.search(r"Question:\s*([^\n]*)", prompt)
    question = " ".join((found.group(1) if found else prompt).split()).lower()
    if question not in _FACTS:
        raise ValueError(f"not a question of the task world: {prompt!r}. Build prompts with "
                         "render(fact.question) from task.facts(), or read the task_*.jsonl files.")
    return _FACTS[question]


def judge(prompt: str, response: str) -> dict:
    """The parts of the true reward of `response` to `prompt` (any string; never raises on it).

    - first sentence: the text up to the first '.', '!' or '?' (all of it if there is none),
      lower-cased, spaces collapsed;
    - on_topic: it names the question's subject ("australia", "3 plus 5", "2 hours");
    - correct: on_topic and it ends with "is <right answer>" ("is canberra", "is 120 minutes");
    - brief: 1 / (1 + extra), extra = the sentences after the first, plus one if the response
      stops mid-sentence. A response with no text has brief 0.
    - reward = (2 * correct + on_topic * brief) / 3, in [0, 1]: 1 for the right answer in one
      sentence, 1/3 for the slip in one sentence, 0 for anything that misses the question.
    """
    fact = fact_of(prompt)
    if not isinstance(response, str):
        raise TypeError(f"response must be a string, got {type(response).__name__}.")
    sentences = [s.strip() for s in _SENTENCES.findall(response) if s.strip()]
    if not sentences:
        return {"correct": False, "on_topic": False, "brief": 0.0, "reward": 0.0}
    first = " ".join(sentences[0].lower().split()).rstrip(".!? ")
    on_topic = re.search(rf"(?<!\w){re.escape(fact.subject.lower())}(?!\w)", first) is not None
    correct = on_topic and first.endswith(f" is {fact.answer.lower()}")
    extra = len(sentences) - 1 + (sentences[-1][-1] not in ".!?")
    brief = 1.0 / (1 + extra)
    return {"correct": correct, "on_topic": on_topic, "brief": brief,
            "reward": (2.0 * correct + on_topic * brief) / 3.0}


def reward(prompt: str, response: str) -> float:
    """The true reward in [0, 1] (see `judge`): deterministic, defined for any response string.

    1.0: the right answer in one sentence; 0.83: right, then one filler sentence; 0.33: the
    slip in one sentence; 0.0: empty, off-topic or garbage. Raises ValueError for a prompt that
    is not a question of the task world.
    """
    return judge(prompt, response)["reward"]


# ---- sampling and scoring a model --------------------------------------------------------------

@contextmanager
def _quiet_padding_check():
    """Hide transformers' "pass an attention_mask" warning while sampling: each prompt is
    sampled alone, so nothing is padded, and the course tokenizer's pad token is also its EOS,
    which is what sets the warning off."""
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], n_samples: int = 4, temperature: float = 1.0,
           max_new_tokens: int = 32, seed: int = 0, reference: bool = False) -> list[dict]:
    """`n_samples` sampled responses to each prompt: one row per prompt, padding-free.

    Pure sampling from softmax(logits / temperature) (no top-k, no top-p), so at temperature 1
    the responses are draws from the model itself. Prompt i is sampled with seed `seed + i`,
    so a row does not depend on the other prompts. `reference=True` samples a peft model with
    its adapter disabled (the DPO reference). Each row: prompt, prompt_ids (list), response_ids
    (n lists, each ending with EOS unless cut at max_new_tokens) and responses (n strings).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (sampling), got {temperature}.")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    context = model.disable_adapter() if reference else nullcontext()
    rows = []
    with context, _quiet_padding_check():
        for i, prompt in enumerate(prompts):
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
            torch.manual_seed(seed + i)
            out = model.generate(ids.expand(n_samples, -1), attention_mask=torch.ones_like(
                ids.expand(n_samples, -1)), do_sample=True, temperature=temperature, top_k=0,
                top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id)
            response_ids = []
            for row in out[:, ids.shape[1]:].tolist():
                end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row \
                    else len(row)
                response_ids.append(row[:end])
            texts = [tokenizer.decode(r, skip_special_tokens=True) for r in response_ids]
            rows.append({"prompt": prompt, "prompt_ids": ids[0].tolist(),
                         "response_ids": response_ids, "responses": texts})
    model.train(was_training)
    return rows


def score(rows: list[dict]) -> torch.Tensor:
    """(P, n) true rewards of the responses of `sample`'s rows."""
    return torch.tensor([[reward(r["prompt"], y) for y in r["responses"]] for r in rows])


def sample_rewards(model, tokenizer, prompts: list[str], n_samples: int = 4,
                   temperature: float = 1.0, max_new_tokens: int = 32, seed: int = 0,
                   reference: bool = False) -> tuple[torch.Tensor, list[list[str]]]:
    """(P, n) true rewards of sampled responses, and the responses (see `sample`)."""
    rows = sample(model, tokenizer, prompts, n_samples, temperature, max_new_tokens, seed,
                  reference)
    return score(rows), [r["responses"] for r in rows]


def win_rate(policy_rewards: torch.Tensor, reference_rewards: torch.Tensor) -> dict:
    """How often the policy beats the reference, response against response.

    The two tensors have the same shape, e.g. (P, n) from `sample_rewards` with the same seed;
    element k of one is compared with element k of the other. Returns wins, ties, losses
    (counts) and win_rate = wins / (wins + losses), ties left out (NaN if every one is a tie),
    and tie_rate = ties / all.
    """
    if policy_rewards.shape != reference_rewards.shape:
        raise ValueError(f"shapes differ: {tuple(policy_rewards.shape)} vs "
                         f"{tuple(reference_rewards.shape)}; sample both with the same prompts "
                         "and n_samples.")
    wins = int((policy_rewards > reference_rewards).sum())
    losses = int((policy_rewards < reference_rewards).sum())
    ties = policy_rewards.numel() - wins - losses
    decisive = wins + losses
    return {"wins": wins, "ties": ties, "losses": losses,
            "win_rate": wins / decisive if decisive else float("nan"),
            "tie_rate": ties / max(1, policy_rewards.numel())}
