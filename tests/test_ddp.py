"""Data parallel: two CPU processes (gloo) under `accelerate launch` train exactly what one
process trains on the same global batch; resuming and FSDP on two processes."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import without_timing

from dpo_minimal import load_preferences, shipped_data_path
from dpo_minimal.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# 8 pairs and a global batch of 4: two steps an epoch, so 6 steps see every pair three times and
# the reference cache is read for pairs that the other process computed.
COMMON = ["--tiny", "gpt2", "--max-steps", "6", "--max-length", "64", "--max-prompt-length",
          "32", "--learning-rate", "1e-2", "--warmup-steps", "1", "--eval-every", "3",
          "--logging-steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("data")
    paths = []
    for split, n in (("train", 8), ("test", 4)):
        rows = load_preferences(shipped_data_path(split)).select(range(n)).to_list()
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths.append(str(path))
    return tuple(paths)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*args: str) -> str:
    """`accelerate launch` two CPU processes of `python -m dpo_minimal`; their stdout."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               "-m", "dpo_minimal", *args]
    # CPU only, one thread each; this checkout's dpo_minimal.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _history(folder) -> list[dict]:
    return without_timing(json.loads((Path(folder) / "history.json").read_text()))


def _close(one: list[dict], two: list[dict], skip=()) -> float:
    """Largest |a - b| / max(1, |a|) over every metric of every step (steps and keys equal)."""
    assert [sorted(row) for row in one] == [sorted(row) for row in two]
    return max(abs(a[k] - b[k]) / max(1.0, abs(a[k]))
               for a, b in zip(one, two) for k in a if (a["step"], k) not in skip)


@pytest.fixture(scope="module")
def two_processes(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    stdout = _launch("train", *COMMON, "--data", data[0], "--eval-data", data[1],
                     "--batch-size", "2", "--save-steps", "2", "--output-dir", str(out))
    return out, stdout


def test_two_processes_equal_one_with_the_same_global_batch(data, two_processes, tmp_path):
    out, _ = two_processes
    assert main(["train", *COMMON, "--data", data[0], "--eval-data", data[1],
                 "--batch-size", "4", "--output-dir", str(tmp_path)]) == 0
    one, two = _history(tmp_path), _history(out)
    assert one[-1]["loss"] < math.log(2) - 0.05  # it trained: the comparison is not trivial
    assert _close(one, two) < 1e-5


def test_rank_0_alone_logs_and_writes_a_whole_reference_cache(two_processes):
    out, stdout = two_processes
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"]  # once, not per process
    state = torch.load(out / "checkpoint-2" / "state.pt", weights_only=True)
    assert state["world_size"] == 2
    # Each process computed the reference of its 2 pairs per step; every row is in rank 0's cache.
    assert not state["caches"]["reference"].isnan().any()
    assert {p.name for p in out.iterdir()} >= {"adapter", "history.json", "metrics.png",
                                              "checkpoint-6"}


def test_resume_on_two_processes_equals_the_uninterrupted_run(data, two_processes, tmp_path):
    out, _ = two_processes
    _launch("train", *COMMON, "--data", data[0], "--eval-data", data[1], "--batch-size", "2",
            "--save-steps", "2", "--output-dir", str(tmp_path),
            "--resume-from", str(out / "checkpoint-2"))
    assert _history(tmp_path) == _history(out)  # bit for bit, timings aside


def test_a_two_process_checkpoint_refuses_one_process(data, two_processes, tmp_path, capsys):
    out, _ = two_processes
    with pytest.raises(SystemExit) as exited:
        main(["train", *COMMON, "--data", data[0], "--eval-data", data[1], "--batch-size", "2",
              "--save-steps", "2", "--output-dir", str(tmp_path),
              "--resume-from", str(out / "checkpoint-2")])
    assert exited.value.code == 2
    assert "written by 2 process(es)" in capsys.readouterr().err


def test_fsdp_full_fine_tuning_on_two_processes_equals_one(data, tmp_path):
    full = ["--full", "--learning-rate", "1e-4", "--data", data[0], "--eval-data", data[1]]
    _launch("train", *COMMON, *full, "--fsdp", "--batch-size", "2",
            "--output-dir", str(tmp_path / "two"))
    assert main(["train", *COMMON, *full, "--batch-size", "4",
                 "--output-dir", str(tmp_path / "one")]) == 0
    one, two = _history(tmp_path / "one"), _history(tmp_path / "two")
    # At step 1 the policy IS the reference, so each reward is 0 up to float rounding and a
    # "strict win" is a coin toss on that rounding: only there is accuracy not compared.
    assert _close(one, two, skip={(1, "rewards/accuracies")}) < 1e-5
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("one", "two"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


# A stop signal on one process of two, at several points of a step: both processes agree on the
# step to stop after, the checkpoint written is consistent (its optimiser and schedule at its
# step), and the run resumes to what the uninterrupted run trained.
INTERRUPT = '''
import os, signal, sys
import torch
from dpo_minimal.cli import main
from dpo_minimal.train import _Run

where, rank, times = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
calls = []


def send():
    calls.append(1)
    if len(calls) == 3 and int(os.environ["RANK"]) == rank:  # in the third step (or save 2)
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGINT)


def wrap(owner, name):
    real = getattr(owner, name)

    def wrapped(self, *args, **kwargs):
        if where.endswith("before"):
            send()
        out = real(self, *args, **kwargs)
        if not where.endswith("before"):  # after it (the scaler's: inside _Run.update)
            send()
        return out

    setattr(owner, name, wrapped)


wrap(*{"update-before": (_Run, "update"), "update-after": (_Run, "update"),
       "during-update": (torch.amp.GradScaler, "update"), "save-before": (_Run, "save")}[where])
sys.exit(main(sys.argv[4:]))
'''


def _launch_script(script: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               str(script), *args]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("where, rank, times", [
    ("update-before", 1, 1), ("during-update", 0, 2), ("update-after", 1, 2),
    ("save-before", 1, 1)], ids=["before the update", "twice during the update (rank 0)",
                                 "twice after the update (rank 1)", "during a save"])
def test_an_interrupt_on_one_of_two_processes(data, two_processes, tmp_path, where, rank,
                                              times):
    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPT)
    out = tmp_path / "cut"
    args = ["train", *COMMON, "--data", data[0], "--eval-data", data[1], "--batch-size", "2",
            "--save-steps", "2", "--output-dir", str(out)]
    done = _launch_script(script, where, str(rank), str(times), *args)
    # Both processes exit 130 (SIGINT) with a message, without a traceback of their own (the
    # launcher reports its children's exit status with one of its own).
    assert done.returncode != 0 and "exitcode  : 130" in done.stderr, done.stderr[-3000:]
    assert "stopped after" in done.stderr and "dpo_minimal/" not in done.stderr
    newest = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    steps = int(newest.name.split("-")[1])
    state = torch.load(newest / "state.pt", weights_only=True)
    assert state["steps_done"] == steps == state["scheduler"]["last_epoch"]
    assert {s["step"].item() for s in state["optimizer"]["state"].values()} == {steps}
    assert len(json.loads((newest / "history.json").read_text())) == steps
    assert not list(out.glob("*.tmp"))
    if where == "during-update":  # and the run resumes to what the uninterrupted one trained
        _launch(*args, "--resume")
        assert _history(out) == _history(two_processes[0])


def test_processes_reading_other_data_are_refused(data, tmp_path):
    """On a cluster each node may read its own copy of the data: a copy that differs is named."""
    script = tmp_path / "per_rank.py"
    script.write_text("import os, sys\nfrom dpo_minimal.cli import main\n"
                      "args = sys.argv[1:]\nif os.environ['RANK'] == '1':\n"
                      "    args[args.index('--data') + 1] = sys.argv[-1]\n"
                      "sys.exit(main(args[:-1]))\n")
    other = tmp_path / "other.jsonl"
    rows = [json.loads(line) for line in Path(data[0]).read_text().splitlines()]
    other.write_text("".join(json.dumps(row) + "\n" for row in rows[::-1]))
    done = _launch_script(script, "train", *COMMON, "--data", data[0], "--batch-size", "2",
                          "--output-dir", str(tmp_path / "out"), str(other))
    assert done.returncode != 0
    assert "process(es) [1] read other training data than process 0" in done.stderr
    assert not (tmp_path / "out").exists()
