"""The `fedrun` command line: parse, call the library, print. No logic of its own."""
from __future__ import annotations

import functools
import inspect
import logging
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape as rich_escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedrun.words import plural

app = typer.Typer(
    help="Federated learning of language models with privacy protection: run, sweep, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from fedrun import __version__

        typer.echo(f"fedrun {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """fedrun runs federated learning experiments on language models: `fedrun train` for one run."""

JOBS_FAILED = 3  # the exit code of a sweep (or a sweep's resume) in which a job failed; the others ran

OVERRIDES_HELP = ("Hydra overrides: key=value or group=option, e.g. data=shakespeare "
                  "data.path=../shared/data/tinyshakespeare.txt rounds=50 client.lr=0.1")


def _fail_cleanly(action: Callable[[], None], *, debug: bool) -> None:
    """Run `action`; a FedrunError becomes one red line and exit code 2 (traceback with --debug).

    SIGTERM stops a run as Ctrl-C does (status `interrupted`, workers stopped, the resume command
    printed); the exit code is 128 + the signal: 130 for SIGINT, 143 for SIGTERM."""
    from fedrun.core import FedrunError

    received = [signal.SIGINT]

    def on_sigterm(signum: int, frame) -> None:
        received[0] = signal.SIGTERM
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        action()
    except FedrunError as e:
        if debug:
            raise
        console.print(f"[bold red]error:[/] {e}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    except typer.Exit:  # a command's own exit code (JOBS_FAILED), not an error to report
        raise
    except KeyboardInterrupt as e:
        run_dir = getattr(e, "run_dir", None)
        hint = f"; resume with: fedrun resume {shlex.quote(str(run_dir))}" if run_dir else ""
        console.print(f"[yellow]interrupted[/]{hint}", soft_wrap=True, highlight=False)
        raise typer.Exit(128 + received[0]) from None
    except Exception as e:
        if debug:
            raise
        console.print(f"[bold red]error:[/] {type(e).__name__}: {e} (rerun with --debug for the traceback)",
                      soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def command(name: str | None = None, *, on: typer.Typer = app) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a command (on `app`, or on a group of commands such as `cache`) with what every command
    shares, written once: a `--debug` option, logging set up (`--verbose` where the command has it) and
    errors handled by `_fail_cleanly`."""

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(fn)
        def run(*args: Any, debug: bool = False, **kwargs: Any) -> None:
            _setup_logging(kwargs.get("verbose", False))
            _fail_cleanly(lambda: fn(*args, **kwargs), debug=debug)

        signature = inspect.signature(fn)
        flag = inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, annotation="bool",
                                 default=typer.Option(False, "--debug", help="Show full tracebacks on errors."))
        run.__signature__ = signature.replace(parameters=[*signature.parameters.values(), flag])  # type: ignore[attr-defined]
        run.__annotations__ = {**fn.__annotations__, "debug": "bool"}
        return on.command(name)(run)

    return register


def _setup_logging(verbose: bool) -> None:
    handler = RichHandler(console=console, show_path=False, show_time=False)
    logger = logging.getLogger("fedrun")
    logger.handlers = [h for h in logger.handlers if not isinstance(h, RichHandler)] + [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False  # our handlers show fedrun's records; a Hydra-configured root must not repeat them
    handler.setLevel(logging.INFO if verbose else logging.WARNING)


@command()
def train(
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    cfg: bool = typer.Option(False, "--cfg", help="Print the composed config and exit without running."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every round to the terminal."),
) -> None:
    """Run one federated training run and write its run directory.

    What can be set: `fedrun options` (groups, options), `fedrun options GROUP` (keys, defaults, ranges)."""
    from omegaconf import OmegaConf

    from fedrun import config
    from fedrun import train as training

    composed = config.compose(overrides or [])
    if cfg:
        typer.echo(OmegaConf.to_yaml(composed), nl=False)
        return
    experiment = config.build(composed)
    with _round_progress(composed.rounds) as on_round:
        run_dir, summary = training.train(experiment, on_round=on_round)
    _print_summary(summary)
    typer.echo(str(run_dir))


@command()
def sweep(
    overrides: list[str] | None = typer.Argument(
        None, show_default=False,
        help="Hydra multirun overrides: comma lists are swept as a grid, e.g. strategy=fedavg,fedadam "
             "client.lr=0.01,0.1 seed=0,1,2; hydra/launcher=joblib runs jobs in parallel."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every job and round to the terminal."),
) -> None:
    """Run a sweep over configurations (Hydra multirun): one run directory per job. Exits with
    code 3 when a job failed (after running the others)."""
    from fedrun import sweep as sweeping

    with _job_progress() as on_job:
        sweep_dir = sweeping.run_sweep(overrides or [], on_job=on_job)
    _end_sweep(sweep_dir)


def _end_sweep(sweep_dir: Path) -> None:
    """The table of jobs, the sweep directory on stdout, and exit code JOBS_FAILED if any failed."""
    failed = _print_sweep(sweep_dir)
    typer.echo(str(sweep_dir))
    if failed:
        console.print(f"[bold red]{plural(failed, 'job')} failed[/] (exit code {JOBS_FAILED}); retry with: "
                      f"fedrun resume {shlex.quote(str(sweep_dir))}", soft_wrap=True, highlight=False)
        raise typer.Exit(JOBS_FAILED)


def _print_sweep(sweep_dir: Path) -> int:
    """One line per job: the overrides that differ between jobs, its status and result; returns
    the number of jobs that failed."""
    import json

    from omegaconf import OmegaConf

    from fedrun import sweep_plan

    planned = sweep_plan.planned_jobs(sweep_dir) if sweep_plan.is_planned(sweep_dir) else None
    if planned is not None:  # every job of the grid, also those that never started
        jobs = [job.path for job in planned]
        overrides = {job.path: job.overrides for job in planned}
    else:
        jobs = sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name))
        overrides = {job: list(OmegaConf.load(job / ".hydra" / "overrides.yaml")) for job in jobs}
    labels = dict(zip(jobs, sweep_plan.labels([overrides[job] for job in jobs])))
    table = Table(title=f"sweep {sweep_dir}", title_justify="left")
    for col in ("job", "overrides", "status", "final eval ppl / error"):
        table.add_column(col)
    failed = 0
    for job in jobs:
        status = json.loads((job / "status.json").read_text()) if (job / "status.json").exists() else {}
        summary = json.loads((job / "summary.json").read_text()) if (job / "summary.json").exists() else None
        state = "finished" if summary else status.get("state", "not started")
        failed += state == "failed"
        result = f"{summary['final']['eval_ppl']:.3f}" if summary else status.get("error", "")
        table.add_row(job.name, labels[job], state, result)
    console.print(table)
    return failed


@command()
def resume(
    path: Path = typer.Argument(
        ..., help="A run directory, or a folder of runs (a sweep): resume every unfinished run."),
    overrides: list[str] | None = typer.Argument(
        None, show_default=False, help="rounds=N: extend the runs (finished ones too) to N rounds; "
        "also checkpoint_every=, checkpoint_keep=. Nothing that would change the rounds already run."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every round to the terminal."),
) -> None:
    """Continue stopped runs from their last intact checkpoint, exactly as if never stopped; a
    sweep's jobs that never started are started. Exits with code 3 when a sweep's job failed."""
    from fedrun import sweep as sweeping
    from fedrun import sweep_plan
    from fedrun import train as training
    from fedrun.core import FedrunError
    from fedrun.rundir import is_run_dir

    overrides = overrides or []
    training.resume_changes(overrides)  # a key that may not change: one line before anything runs
    if sweep_plan.is_planned(path):
        with _job_progress() as on_job:
            sweeping.resume_sweep(path, overrides, on_job=on_job)
        _end_sweep(path)
        return
    runs = [path] if is_run_dir(path) else sorted(p.parent for p in path.rglob("metrics.csv") if is_run_dir(p.parent))
    unfinished = [r for r in runs if not (r / "summary.json").exists() or training.extends(r, overrides)]
    if not runs:
        raise FedrunError(f"path: no run directory in {path}")
    if not unfinished:
        console.print(f"nothing to resume: all {plural(len(runs), 'run')} under {path} have finished"
                      f"{'' if overrides else '; extend with rounds=N'}")
    for run in unfinished:
        experiment, rundir, checkpoint = training.load_for_resume(run, overrides)
        with _round_progress(experiment.cfg.rounds, done=checkpoint["round"] if checkpoint else 0) as on_round:
            run_dir, summary = training.resume(experiment, rundir, checkpoint, on_round=on_round)
        _print_summary(summary)
        typer.echo(str(run_dir))


@command()
def report(
    paths: list[Path] = typer.Argument(..., help="Run directories, or folders holding runs (sweeps)."),
    sort: str | None = typer.Option(None, "--sort", help="Sort groups by a metric, e.g. eval_ppl or best_eval_acc."),
    where: list[str] | None = typer.Option(
        None, "--where", help="Keep runs with key=value, e.g. strategy=fedadam (repeatable)."),
    out: Path | None = typer.Option(
        None, "--out", help="Also write report.md, report.csv, report.html and PNG plots here."),
) -> None:
    """Summarise runs: one row per configuration, mean ± std over seeds; optional files and plots."""

    from fedrun.report import report as make_report
    from fedrun.sweep_plan import incomplete

    table, files = make_report(list(paths), sort=sort, where=where or (), out=out)
    # Piped output has no terminal width: give the wide table room instead of rich's 80 columns.
    Console(width=None if sys.stdout.isatty() else 240).print(table)
    for line in incomplete(list(paths)):  # the means above leave out the jobs a stopped sweep never ran
        console.print(f"[yellow]{line}[/]", soft_wrap=True, highlight=False)
    for f in files:
        typer.echo(str(f))


@command("generate")
def generate_command(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    prompt: str = typer.Option("\n", "--prompt", help="Text to continue; on an instruction run, the instruction."),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", help="Tokens to generate (bytes, byte-level)."),
    temperature: float = typer.Option(0.8, "--temperature", help="Softmax temperature; 0 is greedy."),
    top_k: int | None = typer.Option(40, "--top-k", help="Sample among the k most likely tokens."),
    round_: int | None = typer.Option(None, "--round", help="Use the global model of this round's checkpoint."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    raw: bool = typer.Option(False, "--raw", help="Continue the prompt as given, even on an instruction run "
                             "(which otherwise reads it in its template and prints only the response)."),
) -> None:
    """Sample text from a run's final (or --round N) global model."""

    from fedrun.generate import (
        generate,
        generate_response,
        generate_text,
        is_instruction_run,
        load_model,
        printable,
        run_tokenizer,
    )

    model, cfg = load_model(run_dir, round=round_, device="auto")
    device = next(model.parameters()).device
    options: dict[str, Any] = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                                   device=device)
    tokenizer = run_tokenizer(cfg)
    if is_instruction_run(cfg) and not raw:
        text = generate_response(model, prompt, template=cfg.data.get("template"), tokenizer=tokenizer, **options)
    elif tokenizer is None:  # surrogateescape: bytes of the prompt that are not UTF-8 stay those bytes
        text = generate(model, prompt.encode("utf-8", "surrogateescape"), **options)
    else:
        text = generate_text(model, tokenizer, prompt.encode("utf-8", "surrogateescape"), **options)
    typer.echo(printable(text))


@command()
def export(
    run_dir: Path = typer.Argument(..., help="A run directory of a model=hf run."),
    out: Path = typer.Argument(..., help="Folder to write the Hugging Face checkpoint to."),
    round_: int | None = typer.Option(None, "--round", help="Use the global model of this round's checkpoint."),
) -> None:
    """Write a model=hf run's global model as a Hugging Face checkpoint (with LoRA: the adapters, and
    in OUT/base the base they load onto when it was built from model.from_config)."""

    from fedrun.core import FedrunError
    from fedrun.generate import load_model

    model, _ = load_model(run_dir, round=round_, device="cpu")
    save_adapter = getattr(model, "save_adapter", None)  # HFCausalLM's
    if save_adapter is None:
        raise FedrunError(f"run_dir: {run_dir} is not a model=hf run; its weights are in model.safetensors")
    save_adapter(out)
    typer.echo(str(out))


@command("eval")
def eval_command(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    overrides: list[str] | None = typer.Argument(
        None, help="Data to evaluate on, e.g. data=shakespeare data.path=FILE."),
    round_: int | None = typer.Option(None, "--round", help="Use the global model of this round's checkpoint."),
) -> None:
    """Evaluate a run's saved global model on a data set (by default its own test data)."""

    from fedrun.generate import evaluate_run

    scores = evaluate_run(run_dir, overrides or [], round=round_)
    table = Table(title=f"eval of {run_dir}", title_justify="left", show_header=False)
    for key in ("eval_loss", "eval_ppl", "eval_acc"):
        table.add_row(key, f"{scores[key]:.4f}")
    table.add_row("data", f"{scores['data'].get('source')} ({scores['data'].get('clients')} clients)")
    Console().print(table)


@command("data")
def data_command(
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
) -> None:
    """Build the data of a config and print its partition statistics, without training."""

    from fedrun import config
    from fedrun.data.stats import partition_stats

    composed = config.compose(overrides or [])
    stats = partition_stats(config.build_data(composed))
    table = Table(title="partition", title_justify="left", show_header=False)
    for key, value in stats.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)


def _plain_output() -> bool:
    """Output that goes to a file or a pipe (a job's log, `run=$(fedrun train)`): plain lines, no bars."""
    return not (sys.stdout.isatty() and console.is_terminal)


@command("options")
def options_command(
    group: str | None = typer.Argument(None, help="A config group, e.g. strategy: its options and their keys."),
) -> None:
    """List what can be set: the config groups and their options, or one group's options with each
    key's default and allowed values (what validation checks)."""
    from fedrun import options

    out = Console(width=None if sys.stdout.isatty() else 200)
    if group is None:
        table = Table(title="groups: pick an option with group=OPTION (* the default)", title_justify="left")
        table.add_column("group")
        table.add_column("options")
        defaults = options.default_options()
        for name, choices in options.groups().items():
            table.add_row(name, ", ".join(c + "*" * (c in defaults[name]) for c in choices))
        out.print(table)
        _print_keys(out, "top-level keys: key=VALUE", [("", k) for k in options.top_level_keys()])
        typer.echo("a group's options and their keys: fedrun options GROUP")
        return
    found = options.options(group)
    rows = [(o.name + " (default)" * o.is_default, k) for o in found for k in o.keys or [options.KeyInfo("", "", "")]]
    _print_keys(out, f"{group}: pick one with {group}=OPTION, set a key with {group}.KEY=VALUE", rows, option=True)
    for o in found:
        if o.sets:
            typer.echo(f"{group}={o.name} also sets " + " ".join(f"{k}={v}" for k, v in o.sets.items()))


def _print_keys(out: Console, title: str, rows: list, *, option: bool = False) -> None:
    table = Table(title=title, title_justify="left")
    for col in (["option"] if option else []) + ["key", "default", "allowed"]:
        table.add_column(col, overflow="fold")
    previous = None
    for name, key in rows:
        shown = [name if name != previous else ""] if option else []
        table.add_row(*shown, key.name or "(no keys)" if option else key.name, key.default, key.allowed)
        previous = name
    out.print(table)


cache_app = typer.Typer(no_args_is_help=True, help="The on-disk data cache ($FEDRUN_CACHE, default "
                        "~/.cache/fedrun/data): list or clear its entries. FEDRUN_CACHE_MAX_GB caps its size.")
app.add_typer(cache_app, name="cache")


@command("list", on=cache_app)
def cache_list() -> None:
    """One line per entry, most recently used first: short key, the data it holds, size, last use."""
    from fedrun import cache_entries

    found = cache_entries.entries()
    for entry in found:
        typer.echo(cache_entries.describe(entry))
    cap = cache_entries.max_bytes()
    limit = "" if cap is None else f" (FEDRUN_CACHE_MAX_GB={cap / cache_entries.GB:g})"
    typer.echo(f"{cache_entries.summary(found)} in {cache_entries.cache_dir()}{limit}")


@command("clear", on=cache_app)
def cache_clear(
    older_than: str | None = typer.Option(
        None, "--older-than", metavar="AGE", show_default=False,
        help="Only entries last used (written or loaded) more than AGE ago: a number and a unit, s, m, h, d "
             "or w, e.g. 7d, 12h, 30m. Without it: every entry."),
) -> None:
    """Remove data cache entries (every one, or those unused for --older-than); print what was freed.

    An entry a run is writing or loading is waited for, never removed half-way; a run that has
    already loaded one keeps reading it."""
    from fedrun import cache_entries

    age = None if older_than is None else cache_entries.parse_age(older_than)
    removed = cache_entries.clear(older_than=age)
    for entry in removed:
        typer.echo("removed " + cache_entries.describe(entry))
    typer.echo(f"freed {cache_entries.summary(removed)} in {cache_entries.cache_dir()}")


class _round_progress:
    """A rich progress bar over rounds showing the latest train loss and eval perplexity; when
    the output is not a terminal, a plain line on stderr per evaluation round instead."""

    def __init__(self, rounds: int, *, done: int = 0):
        self.rounds, self.plain = rounds, _plain_output()
        self.progress = Progress(
            TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(),
            TextColumn("{task.fields[loss]}"), TextColumn("{task.fields[ppl]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console,
        )
        self.task = self.progress.add_task("train", total=rounds, completed=done, loss="", ppl="")

    def __enter__(self) -> Callable[[dict], None]:
        if self.plain:
            return self.log
        self.progress.start()
        return self.update

    def log(self, row: dict) -> None:
        if row.get("eval_ppl") is None:
            return
        loss = "" if row.get("train_loss") is None else f" train loss {row['train_loss']:.4f},"
        acc = "" if row.get("eval_acc") is None else f", eval acc {row['eval_acc']:.4f}"
        console.print(f"round {row['round']} of {self.rounds}:{loss} eval loss {row['eval_loss']:.4f}, "
                      f"eval ppl {row['eval_ppl']:.3f}{acc}", markup=False, highlight=False, soft_wrap=True)

    def update(self, row: dict) -> None:
        if row["round"] == 0:  # the initial model's evaluation, before any round
            return
        loss = "no client reported" if row["train_loss"] is None else f"train loss {row['train_loss']:.3f}"
        fields: dict[str, Any] = {"loss": loss}  # the task's fields, beside Progress.update's own keywords
        if row.get("eval_ppl") is not None:
            fields["ppl"] = f"eval ppl {row['eval_ppl']:.2f}"
        self.progress.update(self.task, advance=1, **fields)

    def __exit__(self, *exc) -> None:
        if not self.plain:  # a bar never started would still print an empty line
            self.progress.stop()


class _job_progress:
    """A sweep's progress, job by job: in a terminal, a rich bar over the jobs with a line per
    finished job above it; otherwise one plain line per job on stderr."""

    def __init__(self) -> None:
        self.plain = _plain_output()
        self.progress = Progress(TextColumn("[bold]sweep"), MofNCompleteColumn(), BarColumn(),
                                 TextColumn("{task.description}"), TimeElapsedColumn(), console=console)
        self.task: Any = None

    def __enter__(self) -> Callable[[dict], None]:
        if not self.plain:
            self.progress.start()
        return self.update

    def update(self, event: dict) -> None:
        of = f" of {event['of']}" if event.get("of") else ""
        label = f" ({event['label']})" if event.get("label") else ""
        name = f"job {event['job'] + 1}{of}{label}"  # job N is in directory N-1 (Hydra counts from 0)
        if event["state"] == "started":
            if not self.plain:
                if self.task is None:
                    self.task = self.progress.add_task("", total=event.get("of"))
                self.progress.update(self.task, description=f"{name}: running")
            return
        resumed = f"resumed from round {event['from_round']}, " if "from_round" in event else ""
        if event["state"] == "finished":
            line = f"{name}: {resumed}finished, final {event['objective']} {event['value']:.4f}"
        else:
            line = f"{name}: {resumed}failed: {event.get('error', '')}"
        line += f" [{event['run_dir']}]"
        if self.plain:
            console.print(line, markup=False, highlight=False, soft_wrap=True)
            return
        style = "green" if event["state"] == "finished" else "bold red"
        self.progress.console.print(f"[{style}]{rich_escape(line)}[/]", highlight=False, soft_wrap=True)
        if self.task is not None:
            self.progress.advance(self.task)

    def __exit__(self, *exc) -> None:
        if not self.plain:  # a bar never started would still print an empty line
            self.progress.stop()


def _print_summary(summary: dict) -> None:
    privacy = summary.get("privacy") or {}
    dp = privacy.get("epsilon") is not None  # a DP run: its guarantee beside what it cost the model
    table = Table(title="results", title_justify="left")
    for col in ("", "round", "eval loss", "eval ppl", "eval acc", *(["epsilon"] if dp else [])):
        table.add_column(col, justify="right" if col else "left")
    for label in ("initial", "final", "best"):
        m = summary[label]
        table.add_row(label, str(m.get("round", 0)), f"{m['eval_loss']:.4f}", f"{m['eval_ppl']:.3f}",
                      f"{m['eval_acc']:.4f}", *([_spent(m.get("round", 0), summary)] if dp else []))
    console.print(table)
    if dp:
        _print_guarantee(privacy | {"stopped_at_budget": summary.get("stopped_at_budget")},
                         clients=(summary.get("data") or {}).get("clients"))
    _print_empirical(((summary.get("audit") or {}).get("epsilon")) or {})
    mb = (summary["bytes_up"] + summary["bytes_down"]) / 1e6
    console.print(f"{plural(summary['rounds'], 'round')} in {summary['seconds']:.1f} s, {mb:.1f} MB exchanged")


def _spent(round_idx: int, summary: dict) -> str:
    """Epsilon after a round: 0 before the first, the run's after its last; "-" for an earlier best
    (the summary keeps the final epsilon only; metrics.csv has every round's)."""
    if round_idx == 0:
        return "0"
    return f"{summary['privacy']['epsilon']:.4g}" if round_idx == summary["final"].get("round") else "-"


def _print_guarantee(privacy: dict, *, clients: int | None) -> None:
    """The run's (epsilon, delta) and accountant, and a warning where delta is not small."""
    level = privacy.get("level", "user")  # central DP protects a client, local DP an example of one
    target = privacy.get("target_epsilon")
    against = "" if target is None else f"; target epsilon {target:.4g}" + (
        " (stopped at the budget)" if privacy.get("stopped_at_budget") else "")
    console.print(f"privacy: ({privacy['epsilon']:.4g}, {privacy['delta']:.3g})-DP per {level} "
                  f"({privacy['mechanism']}, {privacy['accountant']} accountant){against}", highlight=False)
    if level == "user" and clients:
        limit = min(1e-3, 1 / (10 * clients))  # the mechanism's own warning threshold (fedrun/privacy/central.py)
        if privacy["delta"] > limit:
            console.print(f"[yellow]warning:[/] delta {privacy['delta']:.3g} is above min(1e-3, 1/(10 N)) = "
                          f"{limit:.3g} for N = {clients} clients: the guarantee may fail outright with that "
                          "probability; set privacy.delta lower", soft_wrap=True, highlight=False)


def _print_empirical(audit: dict) -> None:
    """audit=epsilon's point estimates, with how far they move and what they read when nothing leaks."""
    if "all_rounds" not in audit:
        return
    parts = []
    for key, what in (("all_rounds", "every round's model"), ("final", "the final model")):
        e = audit[key]
        low, high = e.get("bootstrap_90") or (float("nan"), float("nan"))
        parts.append(f"{e['epsilon']:.3g} from {what} (90% {low:.3g}..{high:.3g}, floor {e['noise_floor']:.2g})")
    console.print(f"empirical epsilon (audit=epsilon, {audit['canaries_inserted']} canaries inserted, point "
                  f"estimates): {'; '.join(parts)}", soft_wrap=True, highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
