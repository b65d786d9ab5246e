"""`make bench`: run every workload with every contender, each in its own process, and report.

fedrun and the floor run in fedrun's `.venv` (this interpreter); Flower and pfl in
`.venv-bench` (BENCH_PYTHON), reading the workload from a file `benchmarks.export` writes.
Each contender process gets one intra-op thread (BENCH_THREADS, default 1: Ray gives its
workers one, and on a shared 2-core machine two spinning threads per process mostly wait on
each other), and the same start stamp BENCH_T0. Results go to benchmarks/results/.
`python -m benchmarks.run` (BENCH_QUICK=1 for a smoke run of a few minutes).
"""
from __future__ import annotations

import inspect
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import report
from benchmarks.export import export
from benchmarks.measure import TreeMemory
from benchmarks.workloads import FEDRUN, ROOT, SHAKESPEARE, Workload, w1, w2, w3

RESULTS = ROOT / "benchmarks" / "results"
BENCH_PYTHON = os.environ.get("BENCH_PYTHON", str(ROOT / ".venv-bench" / "bin" / "python"))
TIMEOUT = float(os.environ.get("BENCH_TIMEOUT", 1200))  # seconds per contender run
MEMORY_LIMIT_MB = float(os.environ.get("BENCH_MEMORY_LIMIT_MB", 10000))  # per contender process tree


def contender_command(name: str) -> list[str]:
    if name in ("flower", "pfl"):
        return [BENCH_PYTHON, "-m", f"benchmarks.contender_{name}"]
    return [sys.executable, "-m", "benchmarks.contender_floor" if name == "floor" else "benchmarks.contender_fedrun"]


def child_env(export_path: Path | None) -> dict[str, str]:
    threads = os.environ.get("BENCH_THREADS", "1")
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_AUTH_MODE="disabled", BENCH_T0=repr(time.time()))
    if threads != "0":
        env |= {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if export_path is not None:
        env["BENCH_EXPORT"] = str(export_path)
    return env


def run_contender(name: str, workload: Workload, workdir: Path, export_path: Path | None) -> dict:
    """One contender on one workload in a fresh process; its result, or why it failed."""
    shutil.rmtree(workdir, ignore_errors=True)  # fedrun refuses a run_dir that holds a run
    workdir.mkdir(parents=True)
    spec = {"overrides": workload.overrides, "warmup": workload.warmup, "workdir": str(workdir),
            "backend": FEDRUN.get(name, [])}
    (workdir / "spec.json").write_text(json.dumps(spec))
    result_path = workdir / "result.json"
    log = open(workdir / "output.log", "w")
    env = child_env(export_path)
    proc = subprocess.Popen(contender_command(name) + [str(workdir / "spec.json"), str(result_path)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    memory = TreeMemory(proc.pid, limit_mb=MEMORY_LIMIT_MB)
    try:
        rc = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        rc = "timeout"
    tree_mb = memory.stop()
    try:  # whatever it left behind in its own session (Ray's daemons, worker pools)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    log.close()
    base = {"contender": name, "workload": workload.name, "group": workload.group, **workload.point,
            "tree_pss_mb": tree_mb, "wall_seconds": time.time() - float(env["BENCH_T0"])}
    if rc == 0 and result_path.exists():
        return base | json.loads(result_path.read_text())
    if memory.exceeded:
        return base | {"error": f"killed past BENCH_MEMORY_LIMIT_MB={MEMORY_LIMIT_MB:.0f} (process tree PSS)"}
    tail = (workdir / "output.log").read_text().strip().splitlines()[-3:]
    return base | {"error": f"exit {rc}: " + " | ".join(tail)}


def has_cap() -> bool:
    """Whether data=synthetic has the per-client cap of the population-scale work (`++` in the
    overrides then sets it whether or not conf/data/synthetic.yaml declares it yet)."""
    from fedrun.data.synthetic import Synthetic

    return "max_client_examples" in inspect.signature(Synthetic).parameters


def workloads(quick: bool) -> list[Workload]:
    chosen = []
    if SHAKESPEARE.is_file():
        chosen += w1(quick=quick)
    else:
        print(f"W1 skipped: {SHAKESPEARE} not found (the tinyshakespeare file of the project's machines)")
    only = os.environ.get("BENCH_ONLY", "W1,W2,W3").split(",")
    chosen += w2(quick=quick, has_cap=has_cap()) + w3(quick=quick, has_cap=has_cap())
    return [w for w in chosen if w.group in only]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch

    return {"cores": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "python": platform.python_version(),
            "threads_per_contender": os.environ.get("BENCH_THREADS", "1"),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def prepare(workload: Workload, path: Path) -> Path | None:
    """The exported workload file, for the contenders that run outside fedrun's environment."""
    if not {"flower", "pfl"} & set(workload.contenders):
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    return export(workload.overrides, path)


def failed(name: str, workload: Workload, error: str) -> dict:
    return {"contender": name, "workload": workload.name, "group": workload.group, **workload.point,
            "error": error}


def least_disturbed(runs: list[dict]) -> dict:
    """Of one contender's runs on one workload, the one with the fewest seconds per round (the
    machine only ever slows a run down), with every run's figure kept beside it."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    best = min(ok, key=lambda r: r["seconds_per_round"])
    return best | ({"runs_seconds_per_round": [r.get("seconds_per_round") for r in runs]} if len(runs) > 1 else {})


def save(results: list[dict], meta: dict, **extra) -> None:
    """results.json after every contender, so an interrupted run keeps what it measured."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    saved = {"machine": meta, "results": results} | {k: v for k, v in extra.items() if v}
    (RESULTS / "results.json").write_text(json.dumps(saved, indent=2) + "\n")


def measure_in_process(module: str, what: str):
    """`benchmarks.<module>.measure_all()`, in a process of its own with the contenders'
    thread settings; None if it failed (the other results still count)."""
    print(f"{what} ...", flush=True)
    out = RESULTS / "work" / f"{module}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    code = (f"import json, sys; from benchmarks.{module} import measure_all; "
            "open(sys.argv[1], 'w').write(json.dumps(measure_all()))")
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, env=child_env(None),
                          timeout=TIMEOUT, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"    failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(out.read_text())


def main() -> None:
    quick = os.environ.get("BENCH_QUICK", "0") not in ("", "0")
    work = RESULTS / "work"
    results, loads = [], [os.getloadavg()]
    meta = machine() | {"quick": quick, "synthetic_cap": has_cap()}
    chosen = workloads(quick)
    repeats = os.environ.get("BENCH_REPEATS")
    for w in chosen:
        w.repeats = int(repeats) if repeats else w.repeats
    exports: dict[str, Path | None] = {}
    runs: dict[tuple[str, str], list[dict]] = {}
    # Pass r runs every workload that wants r + 1 runs, so that repeats of W3's points interleave
    # and a slow spell of the machine hits every point alike.
    for r in range(max((w.repeats for w in chosen), default=0)):
        for workload in [w for w in chosen if w.repeats > r]:
            slug = workload.name.replace(" ", "_").replace("=", "")
            if slug not in exports:
                try:
                    exports[slug] = prepare(workload, work / f"{slug}.pt")
                except Exception as e:  # a broken workload is reported, the others still run
                    results += [failed(n, workload, f"export: {type(e).__name__}: {e}") for n in workload.contenders]
                    print(f"{workload.name}: export failed: {e}", flush=True)
                    exports[slug] = None
                    workload.repeats = 0
                    continue
            for name in workload.contenders:
                tag = f" (run {r + 1} of {workload.repeats})" if workload.repeats > 1 else ""
                print(f"{workload.name}: {name}{tag} ...", flush=True)
                result = run_contender(name, workload, work / slug / name, exports[slug])
                loads.append(os.getloadavg())
                print("   ", report.one_line(result), flush=True)
                runs.setdefault((workload.name, name), []).append(result)
                results = [x for x in results if (x["workload"], x["contender"]) != (workload.name, name)]
                results.append(least_disturbed(runs[(workload.name, name)]))
                save(results, meta | {"load_average_1m": [round(x[0], 2) for x in loads]})
    # W3's population sweep again, its rounds interleaved in one process (the drift cancels),
    # and the most that training W1's cohort together could gain on this machine.
    w1_ran, w3_ran = (not quick and any(w.group == g for w in chosen) for g in ("W1", "W3"))
    extra = {"w3_interleaved": measure_in_process("w3_interleaved", "W3, the populations' rounds interleaved in one "
                                                  "process") if w3_ran and has_cap() else None,
             "batching_bound": measure_in_process("batching_bound", "W1, the most that training the cohort together "
                                                  "could gain") if w1_ran else None}
    meta |= {"load_average_1m": [round(x[0], 2) for x in loads]}
    save(results, meta, **extra)
    markdown = report.markdown(results, meta, extra)
    (RESULTS / "results.md").write_text(markdown)
    report.plot_w3(results, RESULTS / "w3.png")
    print(markdown)


if __name__ == "__main__":
    main()
