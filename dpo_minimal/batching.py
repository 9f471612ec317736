"""From checked rows to training batches: token ids with the course's truncation rule,
collated (2B, T) batches with the loss mask, and the seeded order in which batches are drawn."""

import warnings

import torch
from torch.utils.data import BatchSampler, RandomSampler


class OverlongPromptError(ValueError):
    """A prompt alone fills max_length, so its pair has no response tokens left to train."""


def check_pad_token(tokenizer) -> None:
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token = "
                         "tokenizer.eos_token (load_model and tiny_model do this).")


def tokenize_preferences(data, tokenizer, max_length: int, max_prompt_length: int | None = None,
                         drop_overlong: bool = False) -> list[dict]:
    """Token ids of a data set's pairs (rows with prompt, chosen, rejected), or of unpaired
    rows (prompt, completion, label), which give prompt_ids, completion_ids and label.

    Every text goes to the tokenizer in one batched call (a fast tokenizer then encodes them
    together); the ids are the same as pair by pair. A pair whose prompt alone fills
    `max_length` raises, naming its row; with `drop_overlong=True` such pairs are dropped instead
    and counted in a warning. A pair whose chosen and rejected ids are identical after the cut
    (they differ only past max_length) is dropped, counted in a warning. A data set left empty
    raises.
    """
    check_pad_token(tokenizer)
    rows = list(data)
    unpaired = bool(rows) and rows[0].get("completion") is not None
    responses = ("completion",) if unpaired else ("chosen", "rejected")
    columns = ("prompt", *responses)
    texts = [row[column] for row in rows for column in columns]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out, dropped, same, k = [], [], [], len(columns)
    for i in range(len(rows)):
        prompt_ids, *response_ids = ids[k * i: k * i + k]
        try:
            example = _truncate(prompt_ids, dict(zip(responses, response_ids)), tokenizer,
                                max_length, max_prompt_length)
        except OverlongPromptError as err:
            if not drop_overlong:
                raise OverlongPromptError(f"row {i}: {err}") from None
            dropped.append(i)
            continue
        except ValueError as err:
            raise ValueError(f"row {i}: {err}") from None
        if unpaired:
            example["label"] = rows[i]["label"]
        elif example["chosen_ids"] == example["rejected_ids"]:
            # The responses differ only past the cut: the pair would train on no preference
            # (its log-ratio margin is exactly 0), so it is dropped, not trained.
            same.append(i)
            continue
        out.append(example)
    if dropped:
        warnings.warn(f"dropped {len(dropped)} of {len(data)} pairs whose prompt fills "
                      f"max_length={max_length} (rows {dropped[:10]}); raise max_length or set "
                      "max_prompt_length to keep them.", stacklevel=2)
    if same:
        warnings.warn(f"dropped {len(same)} of {len(data)} pairs whose chosen and rejected are "
                      f"identical once cut to max_length={max_length} (rows {same[:10]}): they "
                      "differ only after the cut, so they carry no preference; raise max_length "
                      "(or lower max_prompt_length, which leaves the responses more room) to keep "
                      "them.", stacklevel=2)
    if not out:
        raise ValueError(f"no pairs left after tokenising {len(data)} rows with max_length="
                         f"{max_length}, max_prompt_length={max_prompt_length} (a pair is dropped "
                         "when its prompt fills max_length, or when its chosen and rejected are "
                         "identical once cut); raise the limits.")
    return out


def _truncate(prompt_ids, responses: dict, tokenizer, max_length: int,
              max_prompt_length: int | None) -> dict:
    """The course's truncation rule on encoded texts: prompt_ids and, for each response
    {name: ids}, name_ids.

    1. The prompt is cut from the LEFT to its last `max_prompt_length` tokens (the question
       usually sits at its end); None keeps it whole.
    2. Each response, with an EOS appended, is cut from the RIGHT so that prompt + response
       fits in `max_length`.
    A prompt that alone fills `max_length` leaves no response to train on and raises.
    """
    if max_prompt_length is not None and max_prompt_length <= 0:
        raise ValueError(f"max_prompt_length must be positive or None, got {max_prompt_length}.")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, which ends every response; set one.")
    if max_prompt_length is not None:
        prompt_ids = prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    if room <= 0:
        raise OverlongPromptError(
            f"the prompt alone has {len(prompt_ids)} tokens, which fills max_length={max_length}: "
            "raise max_length, set max_prompt_length below it, or drop such pairs "
            "(drop_overlong=True in tokenize_preferences or TrainConfig).")
    return {"prompt_ids": prompt_ids, **{f"{name}_ids": (ids + [tokenizer.eos_token_id])[:room]
                                          for name, ids in responses.items()}}


def collate_pairs(pairs: list[dict], pad_token_id: int) -> dict:
    """Stack B tokenised pairs into one (2B, T) batch: rows 0..B-1 chosen, B..2B-1 rejected.

    Right padding to the batch's own longest row. `loss_mask` is 1 on response tokens only, so
    the prompt and the padding are never trained.
    """
    rows = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs]
    rows += [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    return _collate_rows(rows, pad_token_id)


def collate_unpaired(examples: list[dict], pad_token_id: int,
                     max_length: int | None = None) -> dict:
    """Stack B tokenised unpaired examples into a (B, T) batch for KTO, with its mismatched rows.

    Returns input_ids, attention_mask and loss_mask (B, T), as `collate_pairs` pads them; `label`
    (B,) bool, True for a desirable completion; and `kl`, a batch of the same three keys whose
    row i is prompt i followed by completion i-1 (the completions rotated by one, as in TRL:
    x_1 gets y_B). KTO's reference point z0 is the mean policy/reference log-ratio on these
    mismatched pairs (Ethayarajh et al. 2024). A borrowed completion is cut from the
    right to fit `max_length` after its new prompt (None: no cut).
    """
    rows = [(e["prompt_ids"], e["completion_ids"]) for e in examples]
    room = [None if max_length is None else max_length - len(e["prompt_ids"]) for e in examples]
    mismatched = [(prompt, completion[:n]) for (prompt, _), (_, completion), n
                  in zip(rows, rows[-1:] + rows[:-1], room)]
    return {**_collate_rows(rows, pad_token_id), "kl": _collate_rows(mismatched, pad_token_id),
            "label": torch.tensor([e["label"] for e in examples], dtype=torch.bool)}


def _collate_rows(rows: list[tuple[list, list]], pad_token_id: int) -> dict:
    """(prompt ids, response ids) rows -> right-padded input_ids, attention_mask, loss_mask."""
    width = max(len(a) + len(b) for a, b in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (prompt, response) in enumerate(rows):
        n, m = len(prompt), len(response)
        input_ids[r, : n + m] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[r, : n + m] = 1
        loss_mask[r, n : n + m] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


class Batches:
    """Batches of pairs forever, reshuffled each epoch by a seeded sampler (ragged tails dropped).

    With `world` processes, every process draws the same global batch of `batch_size * world`
    pairs and keeps its own `batch_size` of them (process `rank` the rank-th slice), so the pairs
    of a step do not depend on the number of processes, only on the global batch.
    Its position (the sampler's generator at the start of the epoch, and the batches taken
    since) is saved in a checkpoint and restored exactly.
    """

    def __init__(self, pairs: list, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if len(pairs) < batch_size * world:
            processes = f" x {world} processes" if world > 1 else ""
            raise ValueError(f"batch_size={batch_size}{processes} exceeds the {len(pairs)} "
                             "training pairs: lower batch_size or add data.")
        self.pairs, self.batch_size = pairs, batch_size * world
        self.mine = slice(rank * batch_size, (rank + 1) * batch_size)
        self.generator = torch.Generator().manual_seed(seed)
        self._epoch = None

    def _start_epoch(self) -> None:
        self.epoch_start, self.taken = self.generator.get_state(), 0
        sampler = RandomSampler(self.pairs, generator=self.generator)
        self._epoch = iter(BatchSampler(sampler, self.batch_size, drop_last=True))

    def __next__(self) -> list[dict]:
        if self._epoch is None:
            self._start_epoch()
        indices = next(self._epoch, None)
        if indices is None:
            self._epoch = None
            return next(self)
        self.taken += 1
        return [self.pairs[i] for i in indices[self.mine]]

    def state(self) -> dict:
        if self._epoch is None:
            self._start_epoch()
        return {"epoch_start": self.epoch_start, "taken": self.taken}

    def restore(self, state: dict) -> None:
        self.generator.set_state(state["epoch_start"])
        self._start_epoch()
        for _ in range(state["taken"]):
            next(self)
