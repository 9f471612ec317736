"""Nothing lost, nothing poisoned: output folders checked before work, checkpoints that know
their run, and stop signals that every process agrees on.

- `check_output_dir` refuses, before any work, a folder that cannot hold a run: a file, a folder
  that cannot be written, an empty name, or a folder holding another run's outputs (unless the
  run resumes it or overwrites it).
- `fingerprints` describe what a run trains: its tokenised data, its base model (name, config
  and a checksum of the weights), its LoRA settings, its load dtype and its processes. A
  checkpoint records them in `trainer_state.json` (written last: a checkpoint folder without it
  is incomplete), and `changed_fingerprints` names whatever a resume would change.
- `StopRequests` turns SIGINT and SIGTERM into a request to stop after the current step.
"""

import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from .adapters import save_adapter
from .config import History, NonFiniteLossError, TrainConfig, _divergence_fix
from .logprobs import _is_peft
from .objective import Reference

STATE_FILE = "trainer_state.json"
# What a run leaves in its output folder: checkpoints, and what the command line writes.
RUN_OUTPUTS = ("history.json", "run.json", "metrics.png", "adapter", "model")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: missing, incomplete, unreadable or of another run."""


# --- the output folder ------------------------------------------------------------------------


def run_outputs(folder: Path) -> list[str]:
    """The names in `folder` that a run wrote: checkpoint folders and the command line's files."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.name in RUN_OUTPUTS or _checkpoint_step(p) is not None)


def check_output_dir(output_dir: str | None, resume: bool = False,
                     overwrite: bool = False) -> None:
    """Refuse, before any work, an output folder that cannot hold this run.

    Refused: a path that is a file (or lies under one), a folder that cannot be written, and a
    folder holding another run's outputs (checkpoint-*/, history.json, adapter/, ...) unless
    `resume` (continue that run) or `overwrite` (replace it). Nothing is created or changed:
    whether the folder can be written is tried with a temporary file that is deleted at once.
    """
    if output_dir is None:
        return
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output_dir {str(folder)!r} is a file, not a folder: choose a folder "
                         "name (it is created if missing).")
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"output_dir {str(folder)!r} cannot be created: {str(existing)!r} is a "
                         "file, not a folder. Choose another output_dir.")
    if error := _write_error(existing):
        raise ValueError(f"output_dir {str(folder)!r} cannot be written ({error} in "
                         f"{str(existing)!r}): choose a folder you can write to, or fix its "
                         "permissions.")
    found = run_outputs(folder)
    if found and not resume and not overwrite:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise ValueError(f"output_dir {str(folder)!r} already holds another run ({shown}): "
                         "continue it with --resume (resume_from=True in Python), replace it "
                         "with --overwrite (overwrite_output_dir=True; its checkpoints are "
                         "deleted), or choose another output_dir.")


def check_output_file(path: Path, flag: str = "output") -> None:
    """Refuse, before any work, a file path that cannot be written (`flag` names it)."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory: give a file name, e.g. "
                         f"{path / 'metrics.json'}.")
    folder = path.expanduser().absolute().parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: the folder {folder} does not exist; create it or "
                         "choose another file.")
    if error := _write_error(folder):
        raise ValueError(f"{flag} {path}: the folder {folder} cannot be written ({error}); "
                         "choose another file.")


def _write_error(folder: Path) -> str | None:
    """Why a file cannot be created in `folder`, or None. Tried with a temporary file that is
    deleted at once (os.access would say yes to root even on a read-only file system)."""
    try:
        handle, probe = tempfile.mkstemp(prefix=".dpo-minimal-write-test-", dir=folder)
    except OSError as err:
        return err.strerror
    os.close(handle)
    os.remove(probe)
    return None


def clear_checkpoints(folders: list[Path]) -> None:
    """Delete checkpoint folders (overwrite_output_dir: this run replaces another)."""
    for path in folders:
        shutil.rmtree(path)


# --- finding checkpoints ----------------------------------------------------------------------


def _checkpoint_step(path: Path) -> int | None:
    name = path.name
    digits = name[len("checkpoint-"):]
    return int(digits) if name.startswith("checkpoint-") and digits.isdigit() else None


def read_state(path: Path) -> dict | None:
    """A checkpoint's trainer_state.json, or None when it has none (incomplete, or not ours)."""
    try:
        return json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def checkpoints(root, run_id: str | None = None) -> list[Path]:
    """Complete, finite checkpoint folders under `root`, oldest first; only run `run_id`'s when
    it is given (so that pruning never touches another run's)."""
    found = []
    for path in Path(root).glob("checkpoint-*"):
        state = read_state(path) if path.is_dir() and _checkpoint_step(path) is not None else None
        if state and state.get("finite") and run_id in (None, state.get("run_id")):
            found.append(path)
    return sorted(found, key=_checkpoint_step)


def previous_checkpoint(path: Path) -> Path | None:
    """The newest complete checkpoint beside `path` that is older than it."""
    older = [p for p in checkpoints(path.parent) if _checkpoint_step(p) < _checkpoint_step(path)]
    return older[-1] if older else None


def unreadable(path: Path, name: str, err: Exception) -> CheckpointError:
    """The error for a checkpoint file that is missing, truncated or damaged."""
    before = previous_checkpoint(path) if _checkpoint_step(path) is not None else None
    fix = (f"resume from the previous one, resume_from={str(before)!r} (--resume-from "
           f"{before})" if before else "start the run again without resuming")
    return CheckpointError(f"{path}: {name} cannot be read ({type(err).__name__}: "
                           f"{str(err)[:200]}); the checkpoint is incomplete or damaged: {fix}.")


# --- finiteness -------------------------------------------------------------------------------


def all_finite(tensors) -> bool:
    """Whether every floating-point tensor in `tensors` (nested dicts and lists too) is finite."""
    if isinstance(tensors, torch.Tensor):
        return not tensors.is_floating_point() or bool(torch.isfinite(tensors).all())
    if isinstance(tensors, dict):
        return all(all_finite(v) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return all(all_finite(v) for v in tensors)
    return not isinstance(tensors, float) or math.isfinite(tensors)


# --- fingerprints -----------------------------------------------------------------------------


# Config keys that do not change what a model computes from its weights.
_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
             "_attn_implementation_autoset", "_commit_hash"}


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_digest(pairs: list[dict] | None) -> dict | None:
    """Size and digest of tokenised examples (their token ids and labels)."""
    if pairs is None:
        return None
    keys = ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids", "label")
    rows = [[p.get(k) for k in keys] for p in pairs]
    return {"examples": len(pairs), "sha256": _digest(rows)}


def weights_digest(named: list[tuple[str, torch.Tensor]]) -> str:
    """A checksum of weights: each tensor's shape and up to 256 evenly spaced values (exact
    bytes), cheap on any device and size, and different for any other trained model."""
    h = hashlib.sha256()
    for name, p in named:
        flat = p.detach().reshape(-1)
        picks = torch.linspace(0, flat.numel() - 1, min(flat.numel(), 256)).long()
        # float32 rounds indices above 2**24 (a real model's embedding), the last one past the
        # end: clamp it, which leaves every smaller tensor's checksum as it was
        picks = picks.clamp_(max=flat.numel() - 1)
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(flat[picks.to(flat.device)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _lora_settings(model) -> dict | None:
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return None
    keys = ("r", "lora_alpha", "lora_dropout", "target_modules", "fan_in_fan_out", "bias",
            "modules_to_save", "use_rslora", "use_dora", "layers_to_transform")
    settings = {k: getattr(config, k, None) for k in keys}
    if isinstance(settings["target_modules"], (set, list, tuple)):
        settings["target_modules"] = sorted(settings["target_modules"])
    return json.loads(json.dumps(settings, default=str))


def fingerprints(model, pairs: list[dict], eval_pairs: list[dict] | None,
                 processes: int) -> dict:
    """What a run trains, to be compared when it resumes. Call before the first step: for full
    fine-tuning the base weights are the initial ones."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    frozen = [(n, p) for n, p in model.named_parameters() if "lora_" not in n]
    config = {k: v for k, v in base.config.to_dict().items() if k not in _VOLATILE}
    return {
        "data": data_digest(pairs),
        "eval_data": data_digest(eval_pairs),
        "base_model": {"name": getattr(base.config, "_name_or_path", "") or "",
                       "config": _digest(config), "weights": weights_digest(frozen)},
        "lora": _lora_settings(model),
        "load_dtype": ",".join(sorted({str(p.dtype).removeprefix("torch.") for _, p in frozen})),
        "processes": processes,
    }


def changed_fingerprints(saved: dict, now: dict) -> list[str]:
    """What differs between a checkpoint's fingerprints and this run's, in words."""
    changes = []
    for key, what in (("data", "the training data"), ("eval_data", "the evaluation data")):
        then, now_ = saved.get(key), now[key]
        if then != now_:
            sizes = [None if d is None else d["examples"] for d in (then, now_)]
            changes.append(f"{what} differs (" + ("same size, other token ids" if sizes[0] ==
                           sizes[1] else f"{sizes[0] or 'no'} examples then, "
                           f"{sizes[1] or 'no'} now") + ")")
    then, base = saved.get("base_model", {}), now["base_model"]
    if then.get("config") != base["config"] or then.get("weights") != base["weights"]:
        part = "config" if then.get("config") != base["config"] else "weights"
        changes.append(f"the base model differs (its {part}; {then.get('name') or 'unnamed'!r} "
                       f"then, {base['name'] or 'unnamed'!r} now)")
    lora_then, lora_now = saved.get("lora") or {}, now["lora"] or {}
    if lora_then != lora_now:
        keys = sorted(k for k in {*lora_then, *lora_now} if lora_then.get(k) != lora_now.get(k))
        shown = ", ".join(f"{k} {lora_then.get(k)} then, {lora_now.get(k)} now" for k in keys)
        changes.append(f"the LoRA settings differ ({shown or 'an adapter then, none now'})"
                       if lora_then and lora_now else
                       f"the model had {'a LoRA adapter' if lora_then else 'no adapter'} then "
                       f"and {'has one' if lora_now else 'has none'} now")
    if saved.get("load_dtype") != now["load_dtype"]:
        changes.append(f"the load dtype of the weights differs ({saved.get('load_dtype')} "
                       f"then, {now['load_dtype']} now)")
    if saved.get("processes") != now["processes"]:
        changes.append(f"it was written by {saved.get('processes')} process(es) and this run "
                       f"has {now['processes']} (the data order is per global batch, batch_size"
                       " x processes: resume with as many)")
    return changes


# --- stop signals -----------------------------------------------------------------------------


class StopRequests:
    """SIGINT (Ctrl-C) and SIGTERM (Slurm, Kubernetes, `timeout`) during training.

    The first signal asks the run to stop after the current step: every process then agrees on
    that step, the checkpoint is saved, and the run raises KeyboardInterrupt. In a run of one
    process a second signal stops at once (KeyboardInterrupt), except inside `deferred()` (the
    optimiser update and its bookkeeping, a save), which finishes first so that no state is
    half written. With several processes (`alone=False`) every signal waits for the step's end,
    where all of them agree: one stopping alone would leave the others waiting for it.
    Handlers are installed only in the main thread, and the previous ones restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True, alone: bool = True):
        self.requested, self.signum, self.announce, self.alone = False, None, announce, alone
        self._depth, self._pending, self._previous = 0, False, {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            self.requested, self.signum = True, signum
            if self.announce:
                again = " (send it again to stop at once)" if self.alone else ""
                print(f"dpo-minimal: {signal.Signals(signum).name} received: stopping after this "
                      f"step, with a checkpoint if output_dir is set{again}.", file=sys.stderr,
                      flush=True)
        elif not self.alone:
            return
        elif self._depth:
            self._pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def deferred(self):
        """A second signal inside waits until the block is done."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._pending and not self._depth:
            self._pending = False
            raise KeyboardInterrupt


# --- saving, loading and restoring a run ------------------------------------------------------


# Settings that may differ between a run and its resumption: they do not change the steps
# already taken. A larger max_steps continues the run (the schedule is stretched to it from
# the current step, as in TRL).
_RESUMABLE = {"progress", "output_dir", "save_steps", "save_total_limit", "device", "eval_every",
              "eval_batch_size", "logging_steps", "overwrite_output_dir", "max_steps"}


def foreign_checkpoints(config: TrainConfig, run_id: str, fresh: bool) -> list[Path]:
    """Checkpoint folders in output_dir that are not this run's: refused, or with
    overwrite_output_dir the ones to delete (a fresh run replaces every one of them)."""
    if config.output_dir is None or not Path(config.output_dir).is_dir():
        return []
    found = [p for p in Path(config.output_dir).glob("checkpoint-*") if p.is_dir()]
    foreign = found if fresh else [p for p in found
                                   if (read_state(p) or {}).get("run_id") not in (None, run_id)]
    if foreign and not config.overwrite_output_dir:
        raise CheckpointError(f"output_dir {config.output_dir!r} holds another run's checkpoints "
                              f"({', '.join(sorted(p.name for p in foreign)[:4])}), which this "
                              "run would overwrite: resume into the folder of the checkpoint, "
                              "choose another output_dir, or replace them with --overwrite "
                              "(overwrite_output_dir=True).")
    return foreign


def _checkpoint_path(resume_from, config: TrainConfig) -> Path:
    """The checkpoint folder to resume: `resume_from`, or with True the newest complete and
    finite one in output_dir."""
    if resume_from is True:
        found = checkpoints(config.output_dir) if config.output_dir is not None else []
        if not found:
            raise CheckpointError(f"resume_from=True but output_dir={config.output_dir!r} holds "
                                  "no checkpoint-{step}/ folder that is complete: pass a "
                                  "checkpoint path, or start without resume_from.")
        return found[-1]
    path = Path(resume_from).expanduser()
    if read_state(path) is None:
        if (path / "state.pt").is_file():
            raise unreadable(path, STATE_FILE, FileNotFoundError("missing"))
        raise CheckpointError(f"resume_from={str(resume_from)!r} is not a checkpoint folder (no "
                              f"{STATE_FILE} in it): pass a checkpoint-{{step}}/ folder written "
                              "by train.")
    return path


def load(resume_from, config: TrainConfig, now: dict | None) -> dict:
    """Everything a resume needs, read and checked against this run before any work: the
    config, the fingerprints (data, base model, LoRA, load dtype, processes), the files."""
    from safetensors.torch import load_file

    path = _checkpoint_path(resume_from, config)
    trainer_state = read_state(path)
    try:
        saved = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise unreadable(path, "config.json", err) from None
    defaults = asdict(TrainConfig())  # a field added since the checkpoint was written: default
    changed = {k: (saved.get(k, defaults[k]), v) for k, v in asdict(config).items()
               if k not in _RESUMABLE and saved.get(k, defaults[k]) != v}
    if changed:
        raise CheckpointError(f"{path} was written with other settings {changed} (saved, now): "
                              "resume with the config it was trained with.")
    steps_done = trainer_state["steps_done"]
    if config.max_steps < steps_done:
        raise CheckpointError(f"{path} has {steps_done} steps done, more than max_steps="
                              f"{config.max_steps}: set max_steps >= {steps_done} to continue "
                              "the run, or resume from an earlier checkpoint.")
    changes = [] if now is None else changed_fingerprints(trainer_state.get("fingerprints", {}),
                                                           now)
    if changes:
        raise CheckpointError(f"{path} is another run's: {'; '.join(changes)}. Resume with the "
                              "model, data and settings it was trained with, or start a new run "
                              "(another output_dir, or overwrite_output_dir=True).")
    loaded = {"path": path, "run_id": trainer_state["run_id"], "steps_done": steps_done}
    for key, name, read in (("weights", "trainable.safetensors", load_file),
                            ("state", "state.pt", lambda f: torch.load(f, weights_only=True)),
                            ("history", "history.json", History.from_json)):
        try:
            loaded[key] = read(path / name)
        except Exception as err:  # noqa: BLE001 - truncated, damaged, missing: all named
            raise unreadable(path, name, err) from None
    return loaded


def save(run, steps_done: int) -> Path | None:
    """Write output_dir/checkpoint-{steps_done}/ (atomically) and prune this run's old ones.

    Only rank 0 writes (every process holds the same state); the others return None.
    Non-finite weights or optimiser state are never written: every process raises
    NonFiniteLossError instead, and the newest finite checkpoint stays.
    """
    from safetensors.torch import save_file

    root = Path(run.config.output_dir)
    trainable, optimizer = run._trainable(), run.optimizer.state_dict()
    # Checked where the tensors are, on every process: only rank 0 needs a CPU copy to write.
    if not (all_finite(trainable) and all_finite(optimizer["state"])):
        newest = checkpoints(root)
        raise NonFiniteLossError(
            f"the weights or optimiser state became non-finite by step {steps_done}, so no "
            f"checkpoint was written (the newest finite one: "
            f"{newest[-1] if newest else 'none'}): {_divergence_fix(run.config)}")
    if run.world.rank != 0:
        return None
    weights = {n: p.detach().cpu().contiguous() for n, p in trainable.items()}
    final, tmp = root / f"checkpoint-{steps_done}", root / f"checkpoint-{steps_done}.tmp"
    with run.stops.deferred():  # a half-written checkpoint is never left as the newest
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(weights, tmp / "trainable.safetensors")
        caches = {"reference": run.reference.cache,
                  "eval_reference": getattr(run.eval_reference, "cache", None)}
        torch.save({"steps_done": steps_done, "optimizer": optimizer,
                    "scheduler": run.scheduler.state_dict(),
                    "scaler": run.scaler.state_dict(), "caches": caches,
                    "world_size": run.world.size, **run.step_state}, tmp / "state.pt")
        (tmp / "config.json").write_text(json.dumps(asdict(run.config), indent=1))
        run.history.to_json(tmp / "history.json")
        if _is_peft(run.model):  # loadable with load_adapter, too
            save_adapter(run.model, tmp / "adapter")
        # Written last: a folder without it is incomplete and is never resumed from.
        (tmp / STATE_FILE).write_text(json.dumps(
            {"steps_done": steps_done, "run_id": run.run_id, "finite": True,
             "fingerprints": run.fingerprints}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        run.saved_at = steps_done
        limit = run.config.save_total_limit
        for old in (checkpoints(root, run.run_id)[:-limit] if limit else []):
            shutil.rmtree(old)
    return final


def restore(run, checkpoint: dict) -> None:
    """Put a loaded checkpoint (`load`) into a run: weights, optimiser, schedule, scaler, data
    position, RNG, reference caches and History."""
    weights, trainable = checkpoint["weights"], run._trainable()
    path, state = checkpoint["path"], checkpoint["state"]
    if set(weights) != set(trainable) or any(
            weights[n].shape != p.shape for n, p in trainable.items()):
        raise CheckpointError(f"{path} holds trainable weights of another model (names or "
                              "shapes differ): resume with the model and adapter settings "
                              "it was trained with.")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(weights[name])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.batches.restore(state["batches"])
    torch.set_rng_state(state["rng"])
    run.reference = Reference(cache=state["caches"]["reference"])
    run.eval_reference = Reference(cache=state["caches"]["eval_reference"])
    if run.eval_pairs is not None and run.eval_reference.cache is None and not _is_peft(
            run.model):
        raise CheckpointError(f"{path} was saved without eval_data; its full fine-tuning "
                              "run has no frozen reference for it: resume without "
                              "eval_data.")
    run.history = checkpoint["history"]
    run.start = run.done = state["steps_done"]
