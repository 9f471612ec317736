"""The command line: `dpo-minimal train | eval | plan`, also `python -m dpo_minimal`.

    dpo-minimal train --tiny gpt2 --data prefs.jsonl --output-dir out --max-steps 50
    accelerate launch --multi_gpu --num_processes 2 -m dpo_minimal train --model gpt2 ...
    dpo-minimal plan microsoft/phi-2 --batch-pairs 2 --seq-len 512 --dtype float16

Every `TrainConfig` field is a flag of `train`, made by transformers' HfArgumentParser from the
dataclass (its type, default and help), so the command line cannot drift from the library; TRL's
names (--learning_rate, --per_device_train_batch_size, ...) work too. A `--config` YAML or JSON
file sets the same options; flags given on the command line override it.
"""

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, make_dataclass, replace
from pathlib import Path

from transformers import HfArgumentParser

from .checkpoint import check_output_dir, check_output_file
from .config import _converter, _field, _value_type, read_options_file
from .distributed import init_process_group
from .losses import LOSSES
from .models import ARCHITECTURES, PRETRAINED_DIR
from .train import DTYPES, SCHEDULERS, History, NonFiniteLossError, TrainConfig

TINY = tuple(ARCHITECTURES)  # the families tiny_model builds


@dataclass
class TrainOptions:
    """The settings of `train` that are not TrainConfig fields: the model, the data, LoRA."""

    model: str | None = _field(None, "a Hub model name or a local folder (from_pretrained)",
                                metavar="NAME_OR_DIR")
    tiny: str | None = _field(None, "a tiny offline model of one architecture",
                               choices=list(TINY))
    pretrained: bool = _field(False, "with --tiny gpt2 or phi: the shipped model trained on "
                               "the course's task world, not a random one")
    data: str | None = _field(None, "preference pairs: a .jsonl/.json file or a Hub data set "
                               "name", metavar="FILE_OR_HUB_NAME")
    split: str = _field("train", "the split of a Hub data set")
    eval_data: str | None = _field(None, "held-out pairs, evaluated every --eval-every steps "
                                    "and at the end", metavar="FILE_OR_HUB_NAME")
    eval_split: str = _field("test", "the split of a Hub --eval-data")
    load_dtype: str = _field("auto", "dtype of the loaded weights: auto is float32 for --full "
                              "and --tiny, else --dtype", choices=["auto", *DTYPES])
    num_train_epochs: float | None = _field(
        None, "passes over the data; sets max_steps from the data's size and the global batch "
        "(max_steps wins if given too)")
    lora_r: int = _field(16, "LoRA rank")
    lora_alpha: int = _field(32, "LoRA scale alpha (the update is scaled by alpha / r)")
    lora_dropout: float = _field(0.05, "LoRA dropout (training sets every dropout to 0, as TRL "
                                  "does)")
    lora_targets: str | None = _field(None, "comma-separated module names to wrap, or "
                                       "all-linear (unset: the family's, from "
                                       "dpo_minimal.models.ARCHITECTURES or PEFT)",
                                       metavar="NAMES")
    full: bool = _field(False, "full fine-tuning: train every weight, no LoRA")
    fsdp: bool = _field(False, "shard a --full model over the processes with FSDP (also "
                         "switched on by an accelerate config with distributed_type: FSDP)")
    resume: bool = _field(False, "continue from the newest checkpoint in --output-dir")
    resume_from: str | None = _field(None, "continue from this checkpoint-{step}/ folder",
                                      metavar="DIR")


# What the command line adds to TrainConfig's fields: TRL's and transformers' names for the same
# setting (every option also answers to --its_name and --its-name), choices, and defaults.
ALIASES = {"overwrite_output_dir": ["--overwrite"],
           "batch_size": ["--per_device_train_batch_size", "--per-device-train-batch-size"],
           "eval_batch_size": ["--per_device_eval_batch_size", "--per-device-eval-batch-size"],
           "eval_every": ["--eval_steps", "--eval-steps"],
           "lr_scheduler": ["--lr_scheduler_type", "--lr-scheduler-type"]}
CHOICES = {"loss_type": list(LOSSES), "dtype": list(DTYPES), "lr_scheduler": list(SCHEDULERS)}
CLI_DEFAULTS = {"logging_steps": 10}
EVAL_FIELDS = ("beta", "loss_type", "label_smoothing", "simpo_gamma", "desirable_weight",
               "undesirable_weight", "max_length", "max_prompt_length", "dtype",
               "eval_batch_size", "device", "fused_gelu", "drop_overlong")


def _flags(cls, group: str, names=None):
    """A copy of dataclass `cls`'s fields (or the `names` among them) for HfArgumentParser,
    which makes a flag of each: the field's help, default and type, plus ALIASES, CHOICES and
    CLI_DEFAULTS. A copy, because the parser rewrites the types of the fields it is given."""
    specs = []
    for f in fields(cls):
        if names is not None and f.name not in names:
            continue
        kind, optional = _value_type(f.type)
        extra = {"choices": CHOICES[f.name]} if f.name in CHOICES else {}
        if kind is not bool and "choices" not in f.metadata and not extra:
            extra["metavar"] = f.metadata.get("metavar", kind.__name__.upper())
        metadata = {**f.metadata, **extra, "help": f.metadata["help"].replace("%", "%%"),
                    "aliases": ALIASES.get(f.name, [])}
        default = CLI_DEFAULTS.get(f.name, f.default)
        specs.append((f.name, bool if kind is bool else _converter(kind, optional),
                      field(default=default, metadata=metadata)))
    flags = make_dataclass(f"{cls.__name__}Flags", specs)
    flags._argument_group_name = group
    return flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpo-minimal", description="Direct Preference Optimization from the command line: "
        "train (LoRA or full), evaluate, and plan GPU memory. Under `accelerate launch` or "
        "`torchrun`, train runs data parallel. `dpo-minimal COMMAND --help` lists a command's "
        "options.")
    # Each command's parser is transformers' HfArgumentParser: a flag per dataclass field.
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=HfArgumentParser)
    train = commands.add_parser(
        "train", help="train a model on preference pairs", allow_abbrev=False,
        dataclass_types=[_flags(TrainOptions, "model, data and LoRA"),
                         _flags(TrainConfig, "training (dpo_minimal.TrainConfig; 'none' for an "
                                "optional value)")],
        description="Train with DPO (or another loss of dpo_minimal.losses.LOSSES) and write the "
        "adapter (or the full model), history.json and metrics.png to --output-dir. Options "
        "come from --config (YAML or JSON) and are overridden by flags.")
    train.add_argument("--config", type=Path, metavar="FILE",
                       help="a YAML or JSON file of options (keys as the flags' names, "
                       "- or _); flags override it")
    train.set_defaults(run=_train_command, parser=train)

    evaluate = commands.add_parser(
        "eval", help="DPO metrics of a model on held-out pairs", allow_abbrev=False,
        dataclass_types=[_flags(TrainConfig, "settings (dpo_minimal.TrainConfig)", EVAL_FIELDS)],
        description="Evaluate a trained adapter (its reference is the base model) or a full "
        "model against --reference-model; prints the metrics as JSON.")
    evaluate.add_argument("--model", help="the base model (Hub name or folder), or the full "
                          "fine-tuned model")
    evaluate.add_argument("--tiny", choices=TINY, help="the tiny offline base model")
    evaluate.add_argument("--adapter", help="a LoRA adapter folder written by train")
    evaluate.add_argument("--reference-model", help="the reference of a full fine-tuned model")
    evaluate.add_argument("--data", required=True, help="a .jsonl/.json file or a Hub data set")
    evaluate.add_argument("--split", default="test", help="the split of a Hub data set")
    evaluate.add_argument("--output", type=Path, help="also write the metrics to this JSON file")
    evaluate.set_defaults(run=_eval_command, parser=evaluate)

    plan = commands.add_parser(
        "plan", help="GPU memory plan of a training step, offline",
        description="Estimate the peak GPU memory of one DPO step (dpo_minimal.memory."
        "plan_memory) from a model's config alone, offline: a Hub name whose config is in "
        "the Hugging Face cache, a local folder, or a config.json file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    plan.add_argument("model", nargs="?", help="Hub name, model folder or config.json")
    plan.add_argument("--tiny", choices=TINY, help="the tiny offline model instead")
    plan.add_argument("--config-json", type=Path, metavar="FILE",
                      help="a model's config.json (instead of MODEL)")
    plan.add_argument("--arch", choices=TINY, help="plan an unregistered family's blocks as "
                      "this family's (default: read off the model)")
    plan.add_argument("--batch-pairs", type=int, default=2, help="pairs per micro-batch per GPU")
    plan.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    plan.add_argument("--dtype", choices=list(DTYPES), default="float16",
                      help="compute dtype")
    plan.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    plan.add_argument("--full", action="store_true", help="full fine-tuning (no LoRA)")
    plan.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                      default=True, help="recompute activations in the backward pass")
    plan.add_argument("--processes", type=int, default=1,
                      help="GPUs; with --fsdp the full fine-tuning states are sharded over them")
    plan.add_argument("--fsdp", action="store_true", help="per-GPU plan under FSDP (--full)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(run=_plan_command, parser=plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse exits 2 on bad arguments)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    if args.command == "train":
        # As TRL's parser does: the launcher's precision, then a --config file's values become
        # the defaults, and the flags override them.
        from_file = {} if args.config is None else _read_config_file(args.config, args.parser)
        launcher = {"fp16": "float16", "bf16": "bfloat16"}.get(
            os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))
        args.parser.set_defaults(**({"dtype": launcher} if launcher else {}), **from_file)
        args, unknown = parser.parse_known_args(argv)
        args.from_file, args.argv = from_file, argv
    if unknown:  # reported with the subcommand's usage, which lists its flags
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.run(args, args.parser)


# -- train ---------------------------------------------------------------------------------


def _read_config_file(path: Path, parser) -> dict:
    """The options in a --config file (`config.read_options_file`); an error exits 2."""
    kinds = {f.name: _value_type(f.type)[0] for f in (*fields(TrainOptions),
                                                       *fields(TrainConfig))}
    try:
        values = read_options_file(path, kinds)
    except ValueError as err:
        parser.error(f"--config {err}")
    if values.get("lora_targets") is not None and isinstance(values["lora_targets"], list):
        values["lora_targets"] = ",".join(map(str, values["lora_targets"]))
    return values


def _given(parser, argv: list[str], name: str) -> bool:
    """Whether option `name` is on the command line `argv` (the parser takes no abbreviations)."""
    flags = next(a.option_strings for a in parser._actions if a.dest == name)
    return any(arg.split("=", 1)[0] in flags for arg in argv)


def _options(args, parser) -> tuple[dict, TrainConfig]:
    """The train command's options (defaults < --config file < flags) and its TrainConfig."""
    names = {f.name for f in fields(TrainConfig)}
    try:
        config = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    except ValueError as err:
        parser.error(str(err))
    options = {f.name: getattr(args, f.name) for f in fields(TrainOptions)}
    options["max_steps_given"] = ("max_steps" in args.from_file
                                  or _given(parser, args.argv, "max_steps"))
    shipped = sorted(d.name for d in PRETRAINED_DIR.iterdir() if d.is_dir())
    if options["pretrained"] and options["tiny"] not in (*shipped, None):
        parser.error(f"--pretrained: no pretrained tiny {options['tiny']} ships; use --tiny "
                     f"{' or '.join(shipped)}, or drop --pretrained.")
    if options["pretrained"] and options["tiny"] is None:
        parser.error(f"--pretrained goes with --tiny {' or '.join(shipped)} (a --model is "
                     "loaded as it is).")
    epochs = options["num_train_epochs"]
    if epochs is not None and not (math.isfinite(epochs) and epochs > 0):
        parser.error(f"--num-train-epochs must be > 0, got {epochs}.")
    if (options["model"] is None) == (options["tiny"] is None):
        parser.error("give exactly one of --model NAME_OR_FOLDER and --tiny "
                     f"{{{','.join(TINY)}}}.")
    for name, allowed in (("tiny", (None, *TINY)), ("load_dtype", ("auto", *DTYPES))):
        if options[name] not in allowed:  # a --config value, which argparse does not check
            parser.error(f"{name} {options[name]!r}: use one of {', '.join(allowed[1:])}.")
    if options["data"] is None:
        parser.error("--data is required: a .jsonl/.json file of prompt/chosen/rejected rows, or "
                     "a Hub data set name.")
    if config.output_dir is None:
        parser.error("--output-dir is required: the adapter, history.json, metrics.png and "
                     "checkpoints are written there.")
    if options["resume"] and options["resume_from"] is not None:
        parser.error("give --resume (newest checkpoint) or --resume-from PATH, not both.")
    try:  # before the model is loaded: a folder that cannot hold the run is found at once
        check_output_dir(config.output_dir, resume=bool(options["resume"] or
                                                        options["resume_from"]),
                         overwrite=config.overwrite_output_dir)
    except ValueError as err:
        parser.error(str(err))
    options["fsdp"] = options["fsdp"] or os.environ.get("ACCELERATE_USE_FSDP", "") == "true"
    if options["fsdp"] and not options["full"]:
        parser.error("FSDP (--fsdp, or an accelerate config with distributed_type: FSDP) shards "
                     "full fine-tuning: add --full, or train LoRA data parallel without FSDP "
                     "(its adapters are small).")
    return options, config


def _rank() -> tuple[int, int, int]:
    """(rank, local rank, world size) from the launcher's environment (torchrun, accelerate)."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def _load_model(options: dict, config: TrainConfig):
    """(model, tokenizer): the base model on this process's device, LoRA unless --full."""
    import torch

    from .models import add_lora, load_model, tiny_model

    load_dtype = options["load_dtype"]
    if load_dtype == "auto":
        load_dtype = "float32" if options["full"] or options["tiny"] else config.dtype
    if options["tiny"]:
        # seed 0: the same base every time
        model, tokenizer = tiny_model(options["tiny"], pretrained=options["pretrained"])
        model = model.to(DTYPES[load_dtype])
    else:
        model, tokenizer = load_model(options["model"], dtype=DTYPES[load_dtype])
    _, local_rank, _ = _rank()
    if config.device is None and torch.cuda.is_available():  # one GPU per process
        torch.cuda.set_device(local_rank)
        model = model.to(f"cuda:{local_rank}")
    if not options["full"]:
        targets = options["lora_targets"]
        torch.manual_seed(config.seed)  # the same LoRA init in every process and every run
        model = add_lora(model, r=options["lora_r"], alpha=options["lora_alpha"],
                         dropout=options["lora_dropout"],
                         target_modules=targets.split(",") if targets else None)
    return model, tokenizer


def _train_command(args, parser) -> int:
    from .data import load_preferences
    from .distributed import shard_fsdp
    from .train import train

    options, config = _options(args, parser)
    init_process_group()  # under torchrun / accelerate launch: join the other processes
    rank, _, world = _rank()
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        # The rows are checked before the model loads (a bad file is found in seconds), then
        # rendered with the model's own chat template.
        load_preferences(options["data"], split=options["split"])
        if options["eval_data"] is not None:
            load_preferences(options["eval_data"], split=options["eval_split"])
        model, tokenizer = _load_model(options, config)
        data = load_preferences(options["data"], split=options["split"], tokenizer=tokenizer)
        eval_data = (None if options["eval_data"] is None else
                     load_preferences(options["eval_data"], split=options["eval_split"],
                                      tokenizer=tokenizer))
        unit = "examples" if "completion" in data.column_names else "pairs"  # KTO's unpaired rows
        global_batch = config.batch_size * config.gradient_accumulation_steps * world
        if options["num_train_epochs"] is not None and not options["max_steps_given"]:
            steps = max(1, math.ceil(options["num_train_epochs"] * len(data) / global_batch))
            config = replace(config, max_steps=steps)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        model = shard_fsdp(model, config.dtype) if options["fsdp"] else model
        say(f"dpo-minimal: {options['model'] or 'tiny ' + options['tiny']}, "
            f"{'full fine-tuning' if options['full'] else 'LoRA r=' + str(options['lora_r'])}"
            f"{' sharded by FSDP' if options['fsdp'] else ''}, {trainable:,} trainable "
            f"parameters; {len(data)} {unit}; {world} process(es), global batch "
            f"{global_batch} {unit}; {config.max_steps} steps.")
        resume = True if options["resume"] else options["resume_from"]
        start = time.perf_counter()
        history = train(model, tokenizer, data, config, eval_data=eval_data, resume_from=resume)
        seconds = time.perf_counter() - start
    except (ValueError, FileNotFoundError, OSError) as err:
        parser.error(str(err))
    except KeyboardInterrupt as err:
        where = getattr(err, "checkpoint", None)
        say(f"dpo-minimal: stopped after {len(getattr(err, 'history', []))} steps"
            f"{'; saved ' + str(where) if where else ''}. Continue with the same command and "
            "--resume.", file=sys.stderr)
        _leave_process_group()
        return 128 + (getattr(err, "signum", None) or signal.SIGINT)  # 130 SIGINT, 143 SIGTERM
    except NonFiniteLossError as err:
        say(f"dpo-minimal: {err}", file=sys.stderr)
        return 1
    written = _write_outputs(model, tokenizer, History(history), options, config,
                             Path(config.output_dir), rank)
    say(History(history).summary(seconds, written))
    _leave_process_group(finished=True)
    return 0


def _write_outputs(model, tokenizer, history, options, config, out: Path, rank: int) -> list:
    """The adapter (or the full model), history.json, metrics.png and run.json; rank 0 only."""
    from .adapters import save_adapter
    from .distributed import full_state_dict

    state = full_state_dict(model) if options["full"] else None  # every process takes part
    if rank != 0:
        return []
    out.mkdir(parents=True, exist_ok=True)
    if options["full"]:
        weights = out / "model"
        model.save_pretrained(weights, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(weights)
    else:
        weights = save_adapter(model, out / "adapter")
    run = {**options, **asdict(config)}
    (out / "run.json").write_text(json.dumps(run, indent=1, default=str))
    return [weights, history.to_json(out / "history.json"), history.plot(out / "metrics.png")]


def _leave_process_group(finished: bool = False) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if finished:  # all get here: none tears down while gloo still serves rank 0's gather
            dist.barrier()
        dist.destroy_process_group()


# -- eval ----------------------------------------------------------------------------------


def _eval_command(args, parser) -> int:
    from .adapters import load_adapter
    from .data import load_preferences
    from .models import load_model, tiny_model
    from .train import evaluate

    if (args.model is None) == (args.tiny is None):
        parser.error("give exactly one of --model and --tiny.")
    if args.adapter is None and args.reference_model is None:
        parser.error("eval needs a reference: --adapter (the base model with the adapter off) "
                     "or --reference-model (for a full fine-tuned --model).")
    names = {f.name for f in fields(TrainConfig)}
    try:
        config = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
        if args.output is not None:
            check_output_file(args.output, '--output')
        load_preferences(args.data, split=args.split)  # a bad file is found before the model
        model, tokenizer = tiny_model(args.tiny) if args.tiny else load_model(args.model)
        if args.adapter is not None:
            model = load_adapter(model, args.adapter)
        reference = None if args.reference_model is None else load_model(args.reference_model)[0]
        data = load_preferences(args.data, split=args.split, tokenizer=tokenizer)
        metrics = evaluate(model, tokenizer, data, config, reference_model=reference)
    except (ValueError, FileNotFoundError, OSError) as err:
        parser.error(str(err))
    text = json.dumps(metrics, indent=1)
    print(text)
    if args.output is not None:
        args.output.write_text(text)
    return 0


# -- plan ----------------------------------------------------------------------------------


def _model_config(args, parser):
    """The transformers config of `plan`'s model, from the cache or disk only (never the Hub)."""
    from transformers import AutoConfig

    if (args.model is None) == (args.tiny is None):
        parser.error("give a model (Hub name, folder or config.json) or --tiny, not both.")
    if args.tiny:
        from .models import tiny_model

        return tiny_model(args.tiny)[0].config
    path = Path(args.model).expanduser()
    try:
        if path.is_file():
            return AutoConfig.from_pretrained(str(path.parent) if path.name == "config.json"
                                              else str(path))
        return AutoConfig.from_pretrained(args.model, local_files_only=True)
    except (OSError, ValueError) as err:
        if path.exists():
            parser.error(f"{path} holds no readable transformers config: {err}")
        parser.error(f"the config of {args.model!r} is not in this machine's Hugging Face cache, "
                     "and plan never downloads: pass a local model folder or config.json, or "
                     "fetch the config once with network: python -c \"from transformers import "
                     f"AutoConfig; AutoConfig.from_pretrained('{args.model}')\".")


# How `plan` prints plan_memory's keys.
LABELS = {"weights": "weights", "lora_parameters": "LoRA adapters",
          "lora_gradients": "gradients (of the trained weights)",
          "optimizer_state": "AdamW moments", "activations_no_checkpointing":
          "activations without checkpointing", "activations_checkpointing":
          "activations with checkpointing", "activations": "activations (this run)",
          "logits": "logits", "cuda_context": "CUDA context", "gradient_bucket":
          "all-reduce buffer", "gathered_weights": "gathered weights (FSDP)", "total": "total"}


def _plan_command(args, parser) -> int:
    from .memory import T4_USABLE_GIB, parallel_plan, plan_memory

    if args.processes < 1:
        parser.error(f"--processes must be >= 1, got {args.processes}.")
    if args.fsdp and not args.full:
        parser.error("--fsdp plans full fine-tuning: add --full.")
    if args.config_json is not None:
        if args.model is not None:
            parser.error("give MODEL or --config-json, not both.")
        args.model = str(args.config_json)
    config = _model_config(args, parser)
    try:
        plan = plan_memory(config, batch_pairs=args.batch_pairs, seq_len=args.seq_len,
                           dtype=args.dtype, lora_r=0 if args.full else args.lora_r,
                           gradient_checkpointing=args.gradient_checkpointing,
                           arch=ARCHITECTURES[args.arch] if args.arch else None)
    except ValueError as err:
        parser.error(str(err))
    if args.fsdp or args.processes > 1:
        plan = parallel_plan(config, plan, args.processes, args.fsdp, args.dtype)
    if args.json:
        print(json.dumps(plan, indent=1))
        return 0
    what = "full fine-tuning" if args.full else f"LoRA r={args.lora_r}"
    where = (f"per GPU, FSDP over {args.processes}" if args.fsdp else
             f"per GPU, each of {args.processes} holding a replica" if args.processes > 1
             else "one GPU")
    print(f"{args.model or 'tiny ' + args.tiny}: {what}, {args.batch_pairs} pairs x "
          f"{args.seq_len} tokens, {args.dtype}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'} ({where})")
    for key, gib in plan.items():
        print(f"  {LABELS.get(key, key):<36} {gib:8.2f} GiB")
    fits = "yes" if plan["total"] <= T4_USABLE_GIB else "no"
    print(f"  fits a T4 ({T4_USABLE_GIB} GiB usable): {fits}")
    return 0
