"""DPO training for a (LoRA) causal LM: the loop, read top to bottom; TRL's metric names.

`train` runs `_train`, the loop, over a `_Run`, which holds what a run needs. The pieces live by
concept: `config` (TrainConfig and the checks made before any work), `objective` (the reference
log-probs and `preference_step`, the loss and its metrics), `checkpoint` (folders, fingerprints,
signals, saving and resuming) and `distributed` (data parallel, FSDP). The step the course is
about is public: `batch_logps` (one forward over chosen + rejected rows), a `Reference` for the
log-probs of pi_ref, and `preference_step`.
"""

import math
import time
import uuid
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .batching import Batches
from .checkpoint import StopRequests, check_output_dir, clear_checkpoints, fingerprints
from .config import (  # noqa: F401 - TrainConfig, History and the errors are this module's API
    SCHEDULERS,
    History,
    NonFiniteLossError,
    TrainConfig,
    _check_adapter,
    _check_token_ids,
    _check_weights_loaded,
    _device,
    _divergence_fix,
)
from .data import check_pad_token, load_preferences, tokenize_preferences
from .distributed import _peak_memory_gib, _World, data_parallel
from .logprobs import DTYPES, _is_fsdp, _is_peft, batch_logps  # noqa: F401
from .models import fused_gelu
from .objective import (  # noqa: F401 - the public step, importable from here as before
    _UNPAIRED_LOSS,
    Reference,
    _add,
    _check_unpaired,
    _collate,
    _evaluate_pairs,
    _needs_reference,
    _per_example,
    _rows_per_example,
    disable_dropout,
    kl_logps,
    metric_means,
    preference_step,
)


def train(model, tokenizer, train_data, config: TrainConfig, eval_data=None,
          resume_from=None) -> History:
    """Train `model` with a preference loss on `train_data`; returns the per-step History.

    - Everything is checked before any work: the config (on construction), the data (through
      `load_preferences`' checks, so raw rows are checked too), the tokenizer, the device, the
      model's context length and trainable parameters, and a checkpoint to resume from.
    - Reference: a peft model's adapter disabled, so no second copy of the weights. With
      `cache_reference` (default) each pair's reference log-probs are kept after their first
      pass, so from the second epoch on a step skips the reference forward. A model without an
      adapter (full fine-tuning) gets its reference log-probs computed once, before the first
      step, from its initial weights.
    - With `fused_gelu` (default) the model's Python tanh GELU runs as one fused kernel during
      training (`models.fused_gelu`; the modules are restored on return).
    - Dropout is set to 0 (in place): the first step's policy is exactly the reference, loss ln 2.
    - One concatenated chosen+rejected forward per micro-batch; AdamW on trainable parameters;
      transformers' warmup + cosine/linear/constant schedule; gradient clipping; autocast (+
      GradScaler for float16).
    - Each step records loss, rewards/*, logps/*, grad_norm, learning_rate, step_seconds (wall
      time of the step, before any evaluation), tokens_per_second, peak_memory_gib; with
      eval_data, eval/* metrics every `eval_every` steps and at the end.
      Train metrics of step s come from the forward before its update, eval/* from after it;
      call evaluate() before training for the reference's values.
    - Output folder: checked before any work (see `checkpoint.check_output_dir`); one holding
      another run is refused unless `resume_from` or `config.overwrite_output_dir` (which
      deletes that run's checkpoints once every check has passed).
    - Checkpoints: with `output_dir` and `save_steps`, `output_dir/checkpoint-{n}/` after every
      `save_steps` steps and at the end (n = steps done); `save_total_limit` prunes only this
      run's. A KeyboardInterrupt or a NonFiniteLossError saves the last completed step (with
      `output_dir` set) and propagates with `.history` and `.checkpoint` attached; weights or
      optimiser state that are not finite are never written. `resume_from` (a checkpoint folder,
      or True for the newest complete one in `output_dir`) continues a run: on CPU its History
      equals the uninterrupted run's bit for bit, timing fields aside. The checkpoint must be
      this run's: the same config (a larger max_steps continues it), tokenised data, base model
      (config and weights checksum), LoRA settings, load dtype and number of processes, else
      CheckpointError names what differs; a damaged file is named with the previous checkpoint.
    - Signals: SIGINT (Ctrl-C) and SIGTERM (a scheduler) stop the run after the current step,
      the same step on every process, with a checkpoint; `.signum` on the KeyboardInterrupt
      says which. Alone, a second signal stops at once (after an update or save in progress).
    - A non-finite loss, or gradient norm (outside float16's scaler), stops training before the
      update with NonFiniteLossError naming the step, the dtype and the likely cause.
    - KTO (loss_type="kto") trains on pairs (z0 from the batch's own completions: cheaper,
      biased) or on unpaired rows (prompt, completion, label) with the paper's z0: the mean
      log-ratio, clamped at 0, of each prompt with the previous example's completion
      (`collate_unpaired`), without gradient; one z0 per micro-batch, as in TRL, averaged over
      the processes (each rotates its own share). Unpaired data needs LoRA and batch_size >= 2;
      rewards/chosen and logps/chosen average over the desirable examples, .../rejected over
      the undesirable ones (left out of a step that drew none), and kl is z0.
    - Data parallel: run under `accelerate launch` or `torchrun` with N processes, each having
      called `distributed.init_process_group()`. Each process takes its `batch_size` share of
      every global batch of batch_size x N pairs, torch's DistributedDataParallel averages the
      gradients in the backward pass (once per accumulated step), the metrics are averaged
      over the global batch, and rank 0 alone shows progress and writes checkpoints; the
      History equals a one-process run's with the same global batch and seed up to float
      rounding. Evaluation runs whole on every process.
    """
    resume_from = None if resume_from is False else resume_from
    run = _Run(model, tokenizer, train_data, config, eval_data, resume_from)
    with _fast_activations(config, model):
        return _train(run)


def _train(run: "_Run") -> History:
    """The loop: per step, accumulate micro-batches, update, record, evaluate, checkpoint.

    Every process runs it; rank 0 alone shows the progress bar, prints and writes checkpoints.
    A stop signal (SIGINT, SIGTERM) ends the loop after the step every process agrees on.
    """
    config, history, main = run.config, run.history, run.world.rank == 0
    bar = tqdm(range(run.start, config.max_steps), desc="DPO", initial=run.start,
               total=config.max_steps, disable=not (config.progress and main))
    try:
        with run.stops:
            if run.start and run.evaluation_due(run.start - 1) and not any(
                    key.startswith("eval/") for key in history[-1]):
                history[-1].update(run.evaluate())  # it was interrupted: as if it never was
            for step in bar:
                run.step(step)
                if run.world.any(run.stops.requested):  # every process stops after this step
                    raise KeyboardInterrupt
                if run.evaluation_due(step):
                    history[-1].update(run.evaluate())
                bar.set_postfix(_shown(history[-1]))
                if main and config.logging_steps and run.done % config.logging_steps == 0:
                    window = history[-config.logging_steps:]
                    tqdm.write(metrics_line(window_mean(window), config.max_steps))
                if config.save_steps and (run.done % config.save_steps == 0
                                          or run.done == config.max_steps):
                    run.save(run.done)
                if run.world.any(run.stops.requested):  # a signal in the evaluation or save
                    raise KeyboardInterrupt
    except (KeyboardInterrupt, NonFiniteLossError) as err:
        # Keep what was done: the state after the last update, with the data position and RNG
        # its successor began with (an unfinished step's gradients are dropped).
        run.optimizer.zero_grad(set_to_none=True)
        err.history, err.signum, err.checkpoint = history, run.stops.signum, None
        if config.output_dir is not None and run.done > run.start and not run.fsdp:
            if run.saved_at != run.done:
                try:
                    run.save(run.done)
                except NonFiniteLossError as poisoned:
                    if isinstance(err, KeyboardInterrupt):
                        raise poisoned from err
            if run.saved_at == run.done and main:
                err.checkpoint = Path(config.output_dir) / f"checkpoint-{run.done}"
        raise
    run.model.eval()
    return history


class _Run:
    """Everything a training run holds: data, references, optimiser, schedule, scaler."""

    def __init__(self, model, tokenizer, train_data, config: TrainConfig, eval_data,
                 resume_from=None):
        from transformers import get_scheduler

        # Checks first: nothing is changed or computed until all of them pass.
        check_pad_token(tokenizer)
        _check_weights_loaded(model)
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.device = _device(config, model)
        self.world, self.fsdp = _World(self.device), _is_fsdp(model)
        if self.fsdp and (config.save_steps or resume_from is not None
                          or config.dtype == "float16"):
            raise ValueError("under FSDP (shard_fsdp) this trainer has no checkpoints, no "
                             "resuming and no float16 GradScaler: set save_steps=0, drop "
                             "resume_from, and use bfloat16 or float32.")
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters: call add_lora(model) "
                             "first, or unfreeze the weights for full fine-tuning.")
        _check_adapter(model, config.dropout)
        if config.dtype == "float16" and any(p.dtype == torch.float16 for p in self.params):
            raise ValueError("dtype='float16' trains with autocast and a GradScaler, which needs "
                             "float32 trainable weights: load the model in float32 for full "
                             "fine-tuning, or train LoRA adapters (peft keeps them in float32).")
        if config.dtype == "float16" and self.device.type != "cuda":
            raise ValueError("dtype='float16' needs a CUDA GPU (autocast + GradScaler); on CPU "
                             "use 'float32' or 'bfloat16'.")
        check_output_dir(config.output_dir, resume=resume_from is not None,
                         overwrite=config.overwrite_output_dir)
        self.pairs = _tokenize(train_data, tokenizer, config, model)
        self.eval_pairs = (None if eval_data is None
                           else _tokenize(eval_data, tokenizer, config, model))
        _check_unpaired(config, model, self.pairs, self.eval_pairs)
        self.fingerprints = None if self.fsdp else fingerprints(
            model, self.pairs, self.eval_pairs, self.world.size)
        data = (self.fingerprints or {}).get("data") or checkpoint.data_digest(self.pairs)
        if others := self.world.differing(str(data)):  # the digest is hashed once per run
            raise ValueError(f"process(es) {others} read other training data than process 0: "
                             "every process must read the same file, split and max lengths.")
        self.batches = Batches(self.pairs, config.batch_size, config.seed, self.world.rank,
                                self.world.size)
        loaded = (None if resume_from is None
                  else checkpoint.load(resume_from, config, self.fingerprints))
        self.run_id = uuid.uuid4().hex if loaded is None else loaded["run_id"]
        self.saved_at = None if loaded is None else loaded["steps_done"]
        foreign = checkpoint.foreign_checkpoints(config, self.run_id, fresh=loaded is None)
        if foreign:  # all checks passed: this run replaces that one (overwrite_output_dir)
            clear_checkpoints(foreign)

        torch.manual_seed(config.seed)
        disable_dropout(model, config.dropout)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()  # so checkpointed blocks see inputs needing grad
        model.to(self.device).train()
        # Several processes: torch's DDP gives every process rank 0's weights and averages the
        # gradients in the backward pass (FSDP shards and reduces them itself).
        self.ddp = data_parallel(model, self.device) if self.world.size > 1 and not self.fsdp \
            else None
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self.scheduler = get_scheduler(SCHEDULERS[config.lr_scheduler], self.optimizer,
                                       config.warmup_steps, config.max_steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.dtype == "float16")
        self.history, self.start, self.done = History(), 0, 0
        self.stops = StopRequests(announce=self.world.rank == 0, alone=self.world.size == 1)
        if loaded is None:
            self.reference, self.eval_reference = self._references()
        else:
            checkpoint.restore(self, loaded)
        self.step_state = self._step_state()

    def _references(self) -> tuple[Reference, Reference]:
        config, model = self.config, self.model
        if not _is_peft(model):  # full fine-tuning: freeze the initial policy's log-probs
            return tuple(
                None if pairs is None else Reference.frozen(
                    model, self.tokenizer, pairs, config.eval_batch_size, config.dtype)
                for pairs in (self.pairs, self.eval_pairs))
        if not config.cache_reference:  # the disabled adapter at every step
            return Reference(), Reference()
        return tuple(Reference(cache=torch.full((len(pairs or []), _rows_per_example(pairs)),
                                                float("nan")))
                     for pairs in (self.pairs, self.eval_pairs))

    def micro_step(self, step: int, sync: bool = True) -> tuple[dict, int]:
        """Forward and backward on one micro-batch: (metric sums, tokens). Under DDP the
        gradients are averaged over the processes only when `sync` (the last micro-batch)."""
        with nullcontext() if sync or self.ddp is None else self.ddp.no_sync():
            return self._micro_step(step)

    def _micro_step(self, step: int) -> tuple[dict, int]:
        config = self.config
        batch = _collate(next(self.batches), self.tokenizer, config.max_length)
        ref = (self.reference.logps(self.model, batch, config.dtype)
               if _needs_reference(config) else None)
        if ref is not None and self.reference.cache is not None and self.world.size > 1:
            self._share_reference(batch, ref)
        if "kl" in batch:
            batch["kl_logps"] = self._kl_logps(batch)
        policy = (self.ddp(batch, config.dtype) if self.ddp is not None
                  else batch_logps(self.model, batch, config.dtype))
        losses, sums = preference_step(policy, ref, batch, config)
        loss = losses.mean() / config.gradient_accumulation_steps
        if not self.world.all_finite(loss):
            where = f" (this process's of {self.world.size})" if self.world.size > 1 else ""
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}{where}) at step {step} in a {config.dtype} "
                f"run: {_divergence_fix(config)}")
        self.scaler.scale(loss).backward()
        return sums, int(batch["attention_mask"].sum())

    def _kl_logps(self, batch: dict):
        """`kl_logps` of the mismatched rows of every process: KTO's z0 is one mean over the
        global micro-batch (TRL gathers it likewise), each process's rows rotated within its
        own share. Per micro-batch, as in TRL: under gradient accumulation each micro-batch
        has its own z0, since its loss and backward come before the next one is drawn."""
        kl = kl_logps(self.model, batch, self.config.dtype)
        return kl if self.world.size == 1 else tuple(self.world.gather(t) for t in kl)

    def _share_reference(self, batch: dict, logps) -> None:
        """Put every process's reference log-probs of this micro-batch in every process's cache.

        Rows are global pair indices, so the caches stay equal (rank 0 saves its own) and a
        pair drawn later by another process is not computed again.
        """
        rows = _per_example(logps).float()
        self.reference.cache[self.world.gather(batch["index"])] = self.world.gather(rows).cpu()

    def step(self, step: int) -> dict:
        """One optimiser step over the global batch; appends its History row (metrics of all
        processes) and advances `done` and `step_state`.

        Means are over the global batch's pairs: every process has the same number of them.
        The update and its record are done as one: a stop signal waits until both are.
        """
        config, start, tokens, totals = self.config, time.perf_counter(), 0, {}
        for i in range(config.gradient_accumulation_steps):
            sums, n_tokens = self.micro_step(step, sync=i == config.gradient_accumulation_steps - 1)
            _add(totals, sums)
            tokens += n_tokens
        with self.stops.deferred():
            grad_norm, lr = self.update()
            seconds = time.perf_counter() - start
            *values, tokens = self.world.sum([*totals.values(), tokens])
            pairs = config.batch_size * config.gradient_accumulation_steps * self.world.size
            row = {"step": step + 1, **metric_means(dict(zip(totals, values)), pairs),
                   "grad_norm": grad_norm, "learning_rate": lr, "step_seconds": seconds,
                   "tokens_per_second": tokens / seconds,
                   "peak_memory_gib": self.world.max(_peak_memory_gib(self.device))}
            self.history.append(row)
            self.done, self.step_state = step + 1, self._step_state()
        return row

    def update(self) -> tuple[float, float]:
        """Clip, step the optimiser and the schedule: (grad norm, the learning rate used). The
        gradients are averaged over the processes already (DDP or FSDP, in the backward), so an
        overflow on one process reaches all, and all skip the step."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm or math.inf)
        lr = self.scheduler.get_last_lr()[0]
        if not self.scaler.is_enabled() and not torch.isfinite(grad_norm):
            # float16's scaler skips such a step by design; in any other dtype it would write
            # NaN into every weight, so the run stops before the update.
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"non-finite gradient norm ({grad_norm.item()}) at step {len(self.history)}, with "
                f"a finite "
                f"loss, in a {self.config.dtype} run: {_divergence_fix(self.config)}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, the same on every process
            grad_norm = grad_norm.full_tensor()
        return grad_norm.item(), lr

    def evaluation_due(self, step: int) -> bool:
        every, last = self.config.eval_every, step == self.config.max_steps - 1
        # After steps N, 2N, ... (counted from 1, as the console counts them) and the last.
        return self.eval_pairs is not None and (last or bool(every and (step + 1) % every == 0))

    def evaluate(self) -> dict:
        metrics = _evaluate_pairs(self.model, self.tokenizer, self.eval_pairs, self.config,
                                  self.eval_reference)
        return {f"eval/{key}": value for key, value in metrics.items()}


    # -- checkpoints ------------------------------------------------------------------------

    def _step_state(self) -> dict:
        """What a step starts from, beyond the weights and optimiser: data position and RNG."""
        return {"batches": self.batches.state(), "rng": torch.get_rng_state()}

    def _trainable(self) -> dict:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def save(self, steps_done: int) -> Path | None:
        """`checkpoint.save`: output_dir/checkpoint-{steps_done}/, this run's old ones pruned."""
        return checkpoint.save(self, steps_done)


def evaluate(model, tokenizer, data, config: TrainConfig, reference_model=None) -> dict:
    """DPO metrics on held-out pairs, without gradients, averaged over all pairs.

    Keys: loss, rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected} and
    entropy (mean next-token entropy of the policy on the responses, nats). The reference is
    the peft model with its adapter disabled, or `reference_model` if given. Like `train`, it
    runs the tanh GELU fused when config.fused_gelu is set, renders conversational rows with
    `tokenizer`'s chat template, and with config.device moves the model (and
    `reference_model`) there first. Unpaired data (loss_type="kto")
    gives KTO's metrics as `train` logs them (no accuracies; kl is z0), z0 estimated per chunk
    of eval_batch_size examples in data order (a last chunk of one borrows its own completion).
    """
    check_pad_token(tokenizer)
    _check_weights_loaded(model)
    device = _device(config, model)
    pairs = _tokenize(data, tokenizer, config, model)
    model.to(device)
    if reference_model is not None:
        reference_model.to(device)
    with _fast_activations(config, model, reference_model):
        return _evaluate_pairs(model, tokenizer, pairs, config, Reference(reference_model))


def _fast_activations(config: TrainConfig, *models) -> ExitStack:
    """`models.fused_gelu` on each model (None is skipped) when config.fused_gelu is set."""
    stack = ExitStack()
    for model in models if config.fused_gelu else ():
        if model is not None:
            stack.enter_context(fused_gelu(model))
    return stack


def _tokenize(data, tokenizer, config: TrainConfig, model=None) -> list[dict]:
    """Rows -> tokenised examples with their index; conversational rows are rendered with
    `tokenizer`'s own chat template (the model's format), and every id must fit `model`."""
    data = load_preferences(data, tokenizer=tokenizer)  # raw rows get the same checks as files
    if "label" in data.column_names and config.loss_type != "kto":
        raise ValueError(_UNPAIRED_LOSS.format(config.loss_type))
    pairs = tokenize_preferences(data, tokenizer, config.max_length, config.max_prompt_length,
                                 drop_overlong=config.drop_overlong)
    if model is not None:
        _check_token_ids(model, tokenizer, pairs)
    return [{**pair, "index": i} for i, pair in enumerate(pairs)]


# What a progress line shows of a History row, where the row has it: name -> (key, format).
_SHOWN = {"loss": ("loss", ".4f"), "acc": ("rewards/accuracies", ".3f"),
          "margin": ("rewards/margins", ".4f"), "kl": ("kl", ".4f")}


def _shown(row: dict) -> dict:
    return {name: format(row[key], form) for name, (key, form) in _SHOWN.items() if key in row}


def window_mean(rows: list[dict]) -> dict:
    """The mean of each training metric over `rows` (a logging window, as TRL logs it); the
    step, learning rate and held-out metrics are the last row's."""
    last = rows[-1]
    means = {key: sum(row[key] for row in rows if key in row) / sum(key in row for row in rows)
             for key in last if not key.startswith("eval/") and key not in ("step",
                                                                              "learning_rate")}
    return {**last, **means}


def metrics_line(row: dict, max_steps: int) -> str:
    """One History row (or a `window_mean` of rows) as a line of text: step, loss, accuracy,
    margin (KTO on unpaired data: margin and kl, its z0), lr, speed, eval loss."""
    line = f"step {row['step']}/{max_steps}"
    line += "".join(f"  {name} {value}" for name, value in _shown(row).items())
    line += f"  lr {row['learning_rate']:.2e}  {row['tokens_per_second']:.0f} tok/s"
    if "eval/loss" in row:
        line += f"  eval loss {row['eval/loss']:.4f}"
        if "eval/rewards/accuracies" in row:
            line += f" acc {row['eval/rewards/accuracies']:.3f}"
    return line
