"""Rehearse full mode offline: every notebook, DPO_COURSE_MODE=full, on a CPU, against a fake Hub.

    python scripts/rehearse.py                      # every notebooks/*.ipynb (make rehearse)
    python scripts/rehearse.py notebooks/04_lora_dpo_gpt2.ipynb   # one notebook
    python scripts/rehearse.py --cuda               # CUDA visible (make rehearse-cuda)
    python scripts/rehearse.py --cuda --dry-run     # on any machine: the wiring, nothing executed

Full mode downloads gpt2, microsoft/phi-2 and jondurbin/truthy-dpo-v0.1 and trains on a GPU, so
CI never ran it. Here scripts/fake_hub_cache.py puts tiny random models and a stand-in data set
under those ids in build/fake-hub, and each notebook runs against it with the Hub offline
(HF_HOME, HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1), CUDA hidden, DPO_COURSE_REHEARSAL=1 (the
notebooks cap steps and sizes with dpo_minimal.course.rehearsal), and its figures sent to the
build folder. It proves that the full-mode code path runs, not what it computes.

The notebooks are read, never written: each runs as a copy in build/rehearsal/ (executed copies
stay there to inspect), with every exercise solution inserted where its cell stands and run in a
copy of the notebook's globals, as the nbval run does (tests/notebook_tools.py). Every error cell
is reported (notebook, cell, exception, first line); the exit status is 1 if there was any.

With --cuda the kernels see the machine's GPU (CUDA_VISIBLE_DEVICES is left as it is), so the
tiny models train on it: the notebooks' full-mode device handling (a batch built on the CPU fed
to a model on the GPU) runs for real, which a CPU rehearsal cannot check. It stops with exit
status 2 when no CUDA GPU is visible; --dry-run then checks the wiring on a CPU instead: it
builds the fake Hub, prints the notebooks and the kernels' environment, and executes nothing.
benchmarks/gpu_check.sh runs the CUDA rehearsal first.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))


def rehearsal_env(hub: Path, out: Path, cuda: bool = False) -> dict:
    """The environment variables a rehearsal kernel runs with (`cuda`: the GPU stays visible)."""
    env = {
        "DPO_COURSE_MODE": "full",
        "DPO_COURSE_REHEARSAL": "1",
        "DPO_COURSE_FIGURES": str(out / "figures"),
        "HF_HOME": str(hub),
        # Explicit too: a caller's own cache variables would otherwise win over HF_HOME.
        "HF_HUB_CACHE": str(hub / "hub"),
        "HF_DATASETS_CACHE": str(hub / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "CUDA_VISIBLE_DEVICES": "",  # a CPU runtime, even on a machine with a GPU
        "PYTHONHASHSEED": "0",
        "TOKENIZERS_PARALLELISM": "false",
        # Tiny models gain nothing from threads, and on shared CI cores threads that wait for
        # each other cost minutes (the smoke notebooks call torch.set_num_threads(1) for this).
        "OMP_NUM_THREADS": "1",
    }
    if cuda:  # the caller's CUDA_VISIBLE_DEVICES (or none: every GPU) decides
        del env["CUDA_VISIBLE_DEVICES"]
    return env


def read_notebook(path: Path, tries: int = 5, wait: float = 3.0):
    """The notebook at `path`; a file caught mid-write (invalid JSON) is read again."""
    import nbformat

    for attempt in range(tries):
        try:
            return nbformat.read(path, as_version=4)
        except (json.JSONDecodeError, nbformat.reader.NotJSONError):
            if attempt == tries - 1:
                raise
            time.sleep(wait)


def with_solutions(nb):
    """A copy of `nb` with each exercise solution as a code cell where its markdown cell stands.

    Each inserted cell carries metadata rehearsal_solution = n and each original code cell
    rehearsal_cell = its index in the notebook, so errors can be named by the notebook's cells.
    """
    import copy

    import nbformat
    from notebook_tools import is_solution, isolated, solution_code

    nb = copy.deepcopy(nb)
    cells, count = [], 0
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            cell.metadata["rehearsal_cell"] = index
        cells.append(cell)
        if is_solution(cell) and solution_code(cell):
            count += 1
            solution = nbformat.v4.new_code_cell(isolated(solution_code(cell)))
            solution.metadata["rehearsal_solution"] = count
            solution.metadata["rehearsal_cell"] = index
            cells.append(solution)
    nb.cells = cells
    return nb


def cell_errors(nb) -> list[dict]:
    """Every error output of an executed notebook: where it is, the exception, the code."""
    found = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") != "error":
                continue
            meta = cell.metadata
            where = f"cell {meta.get('rehearsal_cell', '?')}"
            if "rehearsal_solution" in meta:
                where = f"solution {meta['rehearsal_solution']} (markdown cell {where[5:]})"
            first = next((line for line in cell.source.splitlines()
                          if line.strip() and not line.startswith("#")), "")
            error = f"{output['ename']}: {output['evalue']}"
            if output["ename"] == "KeyboardInterrupt":
                error = "timeout: interrupted after the per-cell limit (--timeout)"
            found.append({"where": where, "error": error,
                          "code": first.strip()[:90]})
    return found


def slowest(nb, n: int = 3) -> list[tuple[float, str]]:
    """The `n` slowest cells (seconds, where) from nbclient's execution timestamps."""
    from datetime import datetime

    times = []
    for cell in nb.cells:
        stamps = cell.metadata.get("execution", {})
        start, end = stamps.get("iopub.execute_input"), stamps.get("shell.execute_reply")
        if start and end:
            seconds = (datetime.fromisoformat(end.rstrip("Z")) -
                       datetime.fromisoformat(start.rstrip("Z"))).total_seconds()
            meta = cell.metadata
            where = (f"solution {meta['rehearsal_solution']}" if "rehearsal_solution" in meta
                     else f"cell {meta.get('rehearsal_cell', '?')}")
            times.append((seconds, where))
    return sorted(times, reverse=True)[:n]


def run_notebook(path: Path, out: Path, timeout: int, solutions: bool) -> dict:
    """Execute a copy of `path` in `out`; returns its errors, wall time and slowest cells.

    Every cell runs even after an error; a cell past `timeout` seconds is interrupted and
    reported as a timeout. Committed outputs are cleared first, so none is mistaken for a result.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    out.mkdir(parents=True, exist_ok=True)
    nb = read_notebook(path)
    nb = with_solutions(nb) if solutions else nb
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                            interrupt_on_timeout=True, resources={"metadata": {"path": str(out)}})
    start, fatal = time.perf_counter(), []
    try:
        client.execute()
    except DeadKernelError as error:  # the rest of the notebook did not run
        fatal = [{"where": "kernel", "error": f"DeadKernelError: {error}"[:300], "code": ""}]
    seconds = time.perf_counter() - start
    nbformat.write(nb, out / path.name)
    return {"notebook": path.name, "seconds": seconds, "errors": cell_errors(nb) + fatal,
            "slowest": slowest(nb)}


def report(results: list[dict]) -> str:
    """A Markdown summary: one line per notebook, then every error."""
    lines = ["| notebook | wall time (s) | errors | slowest cells (s) |", "|---|---|---|---|"]
    for r in results:
        slow = ", ".join(f"{where} {s:.0f}" for s, where in r["slowest"])
        lines.append(f"| {r['notebook']} | {r['seconds']:.0f} | {len(r['errors'])} | {slow} |")
    for r in results:
        for e in r["errors"]:
            lines.append(f"- {r['notebook']} {e['where']}: {e['error']} (`{e['code']}`)")
    return "\n".join(lines) + "\n"


def cuda_available() -> bool:
    """torch sees a CUDA GPU (imported here only: a dry run on a CPU needs no more)."""
    import torch

    return torch.cuda.is_available()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to rehearse (default: notebooks/*.ipynb)")
    parser.add_argument("--hub", type=Path, default=ROOT / "build" / "fake-hub",
                        help="where to build the fake Hugging Face cache (HF_HOME)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "rehearsal",
                        help="where the executed copies, figures and REPORT.md go")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per cell")
    parser.add_argument("--no-solutions", action="store_true",
                        help="do not run the exercise solutions")
    parser.add_argument("--cuda", action="store_true",
                        help="leave CUDA visible: the tiny models train on the GPU (exit 2 "
                             "without one; default --out build/rehearsal-cuda)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the fake Hub, print the notebooks and the kernels' "
                             "environment, execute nothing (works without a GPU)")
    args = parser.parse_args()
    if args.cuda and args.out == ROOT / "build" / "rehearsal":
        args.out = ROOT / "build" / "rehearsal-cuda"
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    if not paths:
        sys.exit("no notebooks found: pass notebook paths, or run from the repository.")

    missing = [str(path) for path in paths if not Path(path).is_file()]
    if missing:
        sys.exit(f"no such notebook: {', '.join(missing)}")
    cuda = cuda_available() if args.cuda else False
    if args.cuda and not cuda and not args.dry_run:
        print("rehearse --cuda: no CUDA GPU is visible to torch (torch.cuda.is_available() is "
              "False). Run it on a machine with a GPU and a CUDA build of torch, or add "
              "--dry-run to check the wiring on a CPU; `make rehearse` is the CPU rehearsal.",
              file=sys.stderr)
        return 2

    from fake_hub_cache import build

    hub, out = build(args.hub.resolve()), args.out.resolve()
    for legacy in ("HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):  # would override the above
        os.environ.pop(legacy, None)
    env = rehearsal_env(hub, out, cuda=args.cuda)
    if args.dry_run:
        where = ("CUDA visible" + ("" if cuda else " (none here: a real run would stop, exit 2)")
                 if args.cuda else "CUDA hidden")
        print(f"dry run, {where}: {len(paths)} notebook(s) would run in full mode against "
              f"{hub}, executed copies and REPORT.md in {out}")
        for path in paths:
            print(f"  {Path(path).name}")
        for key, value in sorted(env.items()):
            print(f"  {key}={value}")
        return 0
    os.environ.update(env)  # the kernels inherit this process's environment
    results = []
    for path in paths:
        result = run_notebook(Path(path), out, args.timeout, not args.no_solutions)
        status = "ok" if not result["errors"] else f"{len(result['errors'])} error(s)"
        print(f"{result['notebook']}: {status} in {result['seconds']:.0f} s", flush=True)
        results.append(result)
    summary = report(results)
    (out / "REPORT.md").write_text(summary)
    print(summary)
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
