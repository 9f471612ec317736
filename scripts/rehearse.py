"""Rehearse full mode offline: every notebook, DPO_COURSE_MODE=full, on a CPU, against a fake Hub.

    python scripts/rehearse.py                      # every notebooks/*.ipynb (make rehearse)
    python scripts/rehearse.py notebooks/04_lora_dpo_gpt2.ipynb   # one notebook

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


def rehearsal_env(hub: Path, out: Path) -> dict:
    """The environment variables a rehearsal kernel runs with."""
    return {
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
    args = parser.parse_args()
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    if not paths:
        sys.exit("no notebooks found: pass notebook paths, or run from the repository.")

    from fake_hub_cache import build

    hub, out = build(args.hub.resolve()), args.out.resolve()
    for legacy in ("HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):  # would override the above
        os.environ.pop(legacy, None)
    os.environ.update(rehearsal_env(hub, out))  # the kernels inherit this process's environment
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
