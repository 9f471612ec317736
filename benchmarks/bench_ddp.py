"""Data parallel on CPU: seconds per global batch, 2 processes x 1 thread vs 1 process x 2 threads.

    .venv/bin/python benchmarks/bench_ddp.py                 # prints the table
    .venv/bin/python benchmarks/bench_ddp.py --write         # and writes benchmarks/DDP.md
    .venv/bin/python benchmarks/bench_ddp.py --repeats 1 --steps 6 --models tiny   # quick look

Both sides do the same work: the same model at the same weights, the same LoRA init, the same
global batch of pairs in the same order, the same number of steps (`dpo_minimal.train`), and the
same total number of CPU threads. One process runs with 2 torch threads and batch_size = the
global batch; two processes (torchrun, gloo) run with 1 thread each and half of it. The time of
a step is its `step_seconds` in the History (rank 0's: it includes waiting for the other
process in the all-reduce); a run's figure is the median over its steps after the first
`--warmup`. Runs alternate between the sides, and each cell is min / median over `--repeats`.
For context, one process with one thread (half the threads) is timed too.
"""

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "DDP.md"
SEED = 0
GLOBAL_BATCH = 8  # pairs per optimiser step
MAX_LENGTH, MAX_PROMPT_LENGTH = 128, 64
# tiny: tiny_model("gpt2") (4 layers, width 128); small: GPT-2 with 6 layers of width 384.
SIDES = ((1, 2), (2, 1), (1, 1))  # (processes, torch threads per process)
MODELS = {"tiny": "tiny_model('gpt2'): 4 layers, width 128",
          "small": "GPT-2, 6 layers, width 384, 6 heads (random init)"}


def _model(name: str):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from dpo_minimal import tiny_model
    from dpo_minimal.models import course_tokenizer

    if name == "tiny":
        return tiny_model("gpt2")
    tokenizer = course_tokenizer()
    config = GPT2Config(n_embd=384, n_layer=6, n_head=6, n_positions=512,
                        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(SEED)
    return GPT2LMHeadModel(config), tokenizer


def worker(args) -> None:
    """One side's run (every process of it); rank 0 prints its step times as one JSON line."""
    import torch

    from dpo_minimal import TrainConfig, add_lora, shipped_data_path, train

    torch.set_num_threads(args.threads)
    model, tokenizer = _model(args.model)
    torch.manual_seed(SEED)
    model = add_lora(model, r=16, alpha=32, dropout=0.0)
    config = TrainConfig(batch_size=args.batch_size, max_length=MAX_LENGTH,
                         max_prompt_length=MAX_PROMPT_LENGTH, max_steps=args.steps,
                         learning_rate=5e-4, progress=False, seed=SEED)
    history = train(model, tokenizer, str(shipped_data_path("train")), config)
    if int(os.environ.get("RANK", 0)) == 0:
        seconds = [row["step_seconds"] for row in history[args.warmup:]]
        print("RESULT " + json.dumps({"median": statistics.median(seconds),
                                      "loss": [row["loss"] for row in history]}))


READING = """## Reading the table

- Both sides train the same thing: the loss column compares their Histories step by step.
- Two processes of one thread each never wait for a second thread of their own; they meet a
  few times per micro-batch and step: the finite-loss check, the gather of new reference
  log-probs, the all-reduce of the LoRA gradients (131,072 float32 values for the tiny model)
  and of the metrics.
- One process with two threads meets its second thread at every parallel operator, thousands
  of times per step. On a machine shared with other jobs, as this one was, the second thread is
  often descheduled and the first waits for it: that process is then much slower than one
  thread alone, and its times vary widely from run to run. The context column (one process,
  one thread) shows the per-thread speed without that effect.
- What the second process buys over one thread alone: the 2-process column against the
  context column (perfect scaling would halve the time).
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(model: str, processes: int, threads: int, steps: int, warmup: int) -> dict:
    worker_args = [str(Path(__file__).resolve()), "--worker", "--model", model, "--threads",
                   str(threads), "--batch-size", str(GLOBAL_BATCH // processes), "--steps",
                   str(steps), "--warmup", str(warmup)]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                 str(processes), "--master_port", str(_free_port())] if processes > 1
                else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run(launcher + worker_args, env=env, capture_output=True, text=True,
                          timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{processes}-process run failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} logical CPUs"


def _versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "peft"))


def environment_notes(load_start: tuple, start: float) -> list[str]:
    """The report's last lines: the machine and its load, the versions, the time taken."""
    return [
        f"- Machine: {_machine()}; load average (1 / 5 / 15 min) "
        f"{' / '.join(f'{x:.1f}' for x in load_start)} at the start and "
        f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} at the end (a shared machine).",
        f"- Versions: python {platform.python_version()}, {_versions()}.",
        f"- Took {(time.time() - start) / 60:.1f} minutes.",
    ]


def write_report(out: Path, title: str, script: str, summary: str, body: str) -> None:
    """Write a benchmark's Markdown report, naming the command that wrote it and when."""
    command = f"python benchmarks/{script} " + " ".join(sys.argv[1:])
    out.write_text(f"# {title}\n\nWritten by `{command.strip()}` on "
                   f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. {summary}\n\n"
                   + body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    parser.add_argument("--write", action="store_true", help=f"write {OUT.name}")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=GLOBAL_BATCH, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    start, load_start = time.time(), os.getloadavg()
    rows = []
    for model in args.models:
        times, losses = {side: [] for side in SIDES}, {}
        for _ in range(args.repeats):
            for side in SIDES:  # alternate, so that a busy minute hits every side
                result = _run(model, *side, args.steps, args.warmup)
                times[side].append(result["median"])
                losses[side] = result["loss"]
                print(f"{model}: {side[0]} process(es) x {side[1]} thread(s): "
                      f"{result['median']:.4f} s/step", flush=True)
        gap = max(abs(a - b) for a, b in zip(losses[(1, 2)], losses[(2, 1)]))
        ratios = [two / one for one, two in zip(times[(1, 2)], times[(2, 1)])]
        rows.append((model, times, ratios, gap))
    table = ["| model | 1 process x 2 threads: s per global batch, min / median | "
             "2 processes x 1 thread | ratio 2p / 1p, run by run: min / median | "
             "largest loss difference 2p vs 1p | context: 1 process x 1 thread |",
             "|---|---|---|---|---|---|"]
    for model, times, ratios, gap in rows:
        cell = lambda xs: f"{min(xs):.4f} / {statistics.median(xs):.4f}"  # noqa: E731
        table.append(f"| {MODELS[model]} | {cell(times[(1, 2)])} | {cell(times[(2, 1)])} | "
                     f"**{min(ratios):.2f}x** / **{statistics.median(ratios):.2f}x** | "
                     f"{gap:.1e} | {cell(times[(1, 1)])} |")
    notes = [
        f"- Global batch {GLOBAL_BATCH} pairs, at most {MAX_LENGTH} tokens per row (the shipped "
        f"data), LoRA r=16 on c_attn, c_proj, c_fc; {args.steps} steps per run, the first "
        f"{args.warmup} not timed; {args.repeats} runs per side, alternating.",
        *environment_notes(load_start, start),
    ]
    text = "\n".join(table + [""] + notes)
    print(text)
    if args.write:
        write_report(OUT, "Data parallel on CPU: 2 processes vs 1 at the same thread count",
                     "bench_ddp.py", "Ratios below 1 mean two processes finish a global batch "
                     "faster than one process with both threads.", text + "\n\n" + READING)


if __name__ == "__main__":
    main()
