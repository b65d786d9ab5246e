"""`make bench`: run every workload with every contender, each in its own process, and report.

fedrun and the floor run in fedrun's `.venv` (this interpreter); Flower and pfl in
`.venv-bench` (BENCH_PYTHON), reading the workload from a file `benchmarks.export` writes.
Each contender process gets one intra-op thread (BENCH_THREADS, default 1: Ray gives its
workers one, and on a shared 2-core machine two spinning threads per process mostly wait on
each other), and the same start stamp BENCH_T0. Results go to benchmarks/results/; a run of
some workload groups only (BENCH_ONLY) keeps the other groups' results from results.json, with
when they were measured. `python -m benchmarks.run` (BENCH_QUICK=1 for a smoke run of a few minutes).
"""
from __future__ import annotations

import importlib.util
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
from benchmarks.workloads import FEDRUN, ROOT, SHAKESPEARE, Workload, w1, w2, w3, w4

RESULTS = ROOT / "benchmarks" / "results"
BENCH_PYTHON = os.environ.get("BENCH_PYTHON", str(ROOT / ".venv-bench" / "bin" / "python"))
TIMEOUT = float(os.environ.get("BENCH_TIMEOUT", 1200))  # seconds per contender run
MEMORY_LIMIT_MB = float(os.environ.get("BENCH_MEMORY_LIMIT_MB", 10000))  # per contender process tree
GROUPS = "W1,W2,W3,W4"
EXTRA_GROUP = {"w3_interleaved": "W3", "batching_bound": "W1"}  # what run.py measures besides, and for which group


def contender_command(name: str, workload: Workload) -> list[str]:
    python = BENCH_PYTHON if name in ("flower", "pfl") else sys.executable
    default = f"benchmarks.contender_{name}" if name in ("flower", "pfl", "floor") else "benchmarks.contender_fedrun"
    return [python, "-m", workload.modules.get(name, default)]


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
    load_before = os.getloadavg()[0]
    proc = subprocess.Popen(contender_command(name, workload) + [str(workdir / "spec.json"), str(result_path)],
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
            "tree_pss_mb": tree_mb, "wall_seconds": time.time() - float(env["BENCH_T0"]),
            "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}  # at its start and end
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
    only = os.environ.get("BENCH_ONLY", GROUPS).split(",")
    chosen = []
    if SHAKESPEARE.is_file():
        chosen += w1(quick=quick)
    else:
        print(f"W1 skipped: {SHAKESPEARE} not found (the tinyshakespeare file of the project's machines)")
    chosen += w2(quick=quick, has_cap=has_cap()) + w3(quick=quick, has_cap=has_cap())
    if "W4" in only:
        chosen += lora_workloads(quick)
    return [w for w in chosen if w.group in only]


def lora_workloads(quick: bool) -> list[Workload]:
    """W4, or nothing and why."""
    if not SHAKESPEARE.is_file():
        print(f"W4 skipped: {SHAKESPEARE} not found (its turns of dialogue are W4's instruction data)")
        return []
    if not all(importlib.util.find_spec(m) for m in ("transformers", "peft")):
        print("W4 skipped: model=hf needs transformers and peft in fedrun's .venv (pip install -e .[llm])")
        return []
    return w4(quick=quick)


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


def earlier(groups: set[str]) -> tuple[list[dict], dict, dict]:
    """What results.json holds for the groups this run leaves out: their results, when they were
    measured (date, load average, note: per group) and the extras measured with them."""
    path = RESULTS / "results.json"
    if not path.is_file():
        return [], {}, {}
    saved = json.loads(path.read_text())
    kept = [r for r in saved["results"] if r["group"] not in groups]
    m, kept_groups = saved["machine"], sorted({r["group"] for r in kept})
    loads = m.get("load_average_1m", [])
    then = ({"date": m["date"]} | ({"load_average_1m": [min(loads), max(loads)]} if loads else {})
            | ({"note": m["note"]} if "note" in m else {}))
    measured = {g: m.get("measured", {}).get(g, then) for g in kept_groups}
    extras = {k: v for k, v in saved.items() if EXTRA_GROUP.get(k) in kept_groups}
    return kept, measured, extras


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
    loads = [os.getloadavg()]
    meta = machine() | {"quick": quick, "synthetic_cap": has_cap()}
    chosen = workloads(quick)
    groups = {w.group for w in chosen}
    # A smoke run stands alone; a full run of some groups joins the published results of the others.
    results, measured, kept_extra = ([], {}, {}) if quick or not chosen else earlier(groups)
    meta |= {"groups": sorted(groups)} | ({"measured": measured} if measured else {})
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
                save(results, meta | {"load_average_1m": [round(x[0], 2) for x in loads]}, **kept_extra)
    # W3's population sweep again, its rounds interleaved in one process (the drift cancels),
    # and the most that training W1's cohort together could gain on this machine.
    w1_ran, w3_ran = (not quick and any(w.group == g for w in chosen) for g in ("W1", "W3"))
    extra = kept_extra | {
        "w3_interleaved": measure_in_process("w3_interleaved", "W3, the populations' rounds interleaved in one "
                                             "process") if w3_ran and has_cap() else kept_extra.get("w3_interleaved"),
        "batching_bound": measure_in_process("batching_bound", "W1, the most that training the cohort together "
                                             "could gain") if w1_ran else kept_extra.get("batching_bound")}
    meta |= {"load_average_1m": [round(x[0], 2) for x in loads]}
    save(results, meta, **extra)
    markdown = report.markdown(results, meta, extra)
    (RESULTS / "results.md").write_text(markdown)
    report.plot_w3(results, RESULTS / "w3.png")
    print(markdown)


if __name__ == "__main__":
    main()
