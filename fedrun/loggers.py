"""Experiment loggers: each round's metrics and the run's config, copied to TensorBoard or MLflow.

metrics.csv in the run directory stays the record that `report` and `resume` read; these
loggers send the same rows to the tools people already browse runs with. Each is a plain class
with `log_config`, `log_round`, `log_summary` and `close`; `make_loggers` builds them by name.
The packages are optional and imported only when their logger is built.

A resumed run logs again the rounds after its checkpoint: TensorBoard is told to hide what the
crashed writer logged from that round on; MLflow goes on in the same MLflow run, where those
rounds then have two points at the same step.
"""
from __future__ import annotations

import json
import logging
import numbers
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from omegaconf import OmegaConf

from fedrun.core import FedrunError

if TYPE_CHECKING:
    from torch.utils.tensorboard.writer import FileWriter

log = logging.getLogger(__name__)

LOGGER_NAMES = ("csv", "tensorboard", "mlflow")  # csv: metrics.csv, written by the run itself
ARTIFACTS = ("config.yaml", "metrics.csv", "summary.json")


class ExperimentLogger(Protocol):
    def log_config(self, cfg: Mapping) -> None: ...

    def log_round(self, row: dict) -> None:
        """One round's metrics at step row["round"]; None values (not evaluated) are skipped."""
        ...

    def log_summary(self, summary: dict) -> None:
        """The final summary's numbers, nested keys joined with '/' (final/eval_ppl), top-level
        ones under summary/ (summary/bytes_up)."""
        ...

    def close(self) -> None:
        """Flush and end the run: finished if log_summary was called, failed otherwise."""
        ...


def make_loggers(names: list[str], run_dir: Path, *, tracking_uri: str | None,
                 experiment: str = "fedrun") -> list[ExperimentLogger]:
    """The loggers named (each once), in order; "csv" is accepted and builds nothing."""
    unknown = [n for n in names if n not in LOGGER_NAMES]
    if unknown:
        raise FedrunError(f"logger: unknown {', '.join(map(repr, unknown))}; allowed: {', '.join(LOGGER_NAMES)}")
    loggers: list[ExperimentLogger] = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            loggers.append(TensorBoardLogger(run_dir))
        elif name == "mlflow":
            loggers.append(MLflowLogger(run_dir, tracking_uri=tracking_uri, experiment=experiment))
    return loggers


def flatten(tree: Mapping, *, sep: str, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level: {"a": {"b": 1}} -> {"a<sep>b": 1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat |= flatten(value, sep=sep, prefix=name)
        else:
            flat[name] = value
    return flat


def numeric(values: Mapping[str, Any]) -> dict[str, float]:
    """The entries that are numbers (bools as 0/1); None, strings and lists are left out."""
    return {k: float(v) for k, v in values.items() if isinstance(v, numbers.Real)}


def round_metrics(row: dict) -> tuple[int, dict[str, float]]:
    """(step, metrics) of a metrics row; the round is the step, not a metric."""
    return int(row["round"]), numeric({k: v for k, v in row.items() if k != "round"})


def summary_metrics(summary: dict) -> tuple[int, dict[str, float]]:
    """(step, metrics) of a run summary, logged at its last round. Its top-level numbers are totals
    named like round metrics (bytes_up, seconds): they go under summary/ so as not to mix with them."""
    flat = numeric(flatten(summary, sep="/"))
    return int(summary.get("rounds", 0)), {k if "/" in k else f"summary/{k}": v for k, v in flat.items()}


def plain_config(cfg: Mapping) -> dict:
    return cast(dict, OmegaConf.to_container(cfg, resolve=True)) if OmegaConf.is_config(cfg) else dict(cfg)


class TensorBoardLogger:
    """Event files under <run_dir>/tensorboard/: scalars per round, the config as YAML text and
    as hparams (its numbers, strings and bools)."""

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch raises ImportError when tensorboard is absent
            raise FedrunError("logger=tensorboard: needs the tensorboard package: pip install -e .[tb]") from e
        self.log_dir = Path(run_dir) / "tensorboard"
        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        self._session_started = False
        self._first_round_logged = False
        self._finished = False
        self._closed = False

    def log_config(self, cfg: Mapping) -> None:
        from tensorboard.plugins.hparams import metadata, plugin_data_pb2

        cfg = plain_config(cfg)
        yaml = OmegaConf.to_yaml(cfg)
        # Indented: a markdown code block, so the text plugin keeps the YAML's indentation.
        self._writer.add_text("config", "\n".join("    " + line for line in yaml.splitlines()), 0)
        start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
        for key, value in flatten(cfg, sep=".").items():
            if isinstance(value, (bool, int, float, str)):
                field = {bool: "bool_value", str: "string_value"}.get(type(value), "number_value")
                setattr(start.hparams[key], field, value)
        self._add_hparams(metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start))
        self._session_started = True

    def log_round(self, row: dict) -> None:
        step, metrics = round_metrics(row)
        if not self._first_round_logged:
            self._mark_restart(step)
            self._first_round_logged = True
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)

    def _mark_restart(self, step: int) -> None:
        """A session start at the first round this writer logs: TensorBoard then hides what an
        earlier writer (a crashed run, now resumed) logged at this step and after."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self._file_writer().add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))

    def log_summary(self, summary: dict) -> None:
        step, metrics = summary_metrics(summary)
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)
        self._finished = True

    def close(self) -> None:
        if self._closed:
            return
        if self._session_started:
            from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

            status = api_pb2.STATUS_SUCCESS if self._finished else api_pb2.STATUS_FAILURE
            end = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
            self._add_hparams(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end))
        self._writer.close()
        self._closed = True

    def _add_hparams(self, tag: str, data) -> None:
        """A summary for TensorBoard's hparams plugin, built here: its own helpers need tensorflow.
        With no experiment summary, TensorBoard takes the run's scalars as the metrics."""
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.plugins.hparams import metadata

        data.version = metadata.PLUGIN_DATA_VERSION
        plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString())
        value = Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))
        self._file_writer().add_summary(Summary(value=[value]))

    def _file_writer(self) -> FileWriter:
        writer = self._writer.file_writer
        assert writer is not None, "SummaryWriter opens its file writer in __init__ and drops it only in close()"
        return writer


def _mlflow_client(tracking_uri: str):
    """An MlflowClient with MLflow's usage telemetry off: an experiment run must not reach out."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    # MLflow 3 keeps the file store (mlruns/) in maintenance mode and refuses it unless allowed;
    # a database store would need the full mlflow package (sqlalchemy, alembic).
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        import mlflow
        from mlflow.tracking import MlflowClient
    except ImportError as e:
        raise FedrunError("logger=mlflow: needs the mlflow-skinny package: pip install -e .[mlflow]") from e
    mlflow.telemetry.set_telemetry_client()  # drops a client made by an import before the variable was set
    return MlflowClient(tracking_uri=tracking_uri)


class MLflowLogger:
    """One MLflow run per fedrun run (a resumed run goes on in the same one): the flattened config
    as params, the rounds' metrics with their step, the summary's numbers, and config.yaml,
    metrics.csv and summary.json as artifacts at close. A local file store under
    <run_dir>/mlruns unless `tracking_uri` names another."""

    RUN_FILE = "mlflow_run.json"  # in the run directory: where to go on when resuming

    def __init__(self, run_dir: Path, *, tracking_uri: str | None, experiment: str):
        self.run_dir = Path(run_dir)
        self.tracking_uri = tracking_uri or (self.run_dir / "mlruns").resolve().as_uri()
        self._client = _mlflow_client(self.tracking_uri)
        self.run_id = self._resumed_run_id() or self._new_run_id(experiment)
        self._finished = False
        self._closed = False

    def _resumed_run_id(self) -> str | None:
        path = self.run_dir / self.RUN_FILE
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        if saved.get("tracking_uri") != self.tracking_uri:
            return None
        self._client.update_run(saved["run_id"], status="RUNNING")
        log.info("mlflow: resuming run %s", saved["run_id"])
        return saved["run_id"]

    def _new_run_id(self, experiment: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self._client.get_experiment_by_name(experiment)
        if found is None:
            try:
                experiment_id = self._client.create_experiment(experiment)
            except MlflowException:  # created meanwhile by a parallel run of the same sweep
                experiment_id = self._client.get_experiment_by_name(experiment).experiment_id
        else:
            experiment_id = found.experiment_id
        run = self._client.create_run(experiment_id, run_name=self.run_dir.name,
                                      tags={"fedrun.run_dir": str(self.run_dir.resolve())})
        record = {"tracking_uri": self.tracking_uri, "run_id": run.info.run_id}
        (self.run_dir / self.RUN_FILE).write_text(json.dumps(record) + "\n")
        return run.info.run_id

    def log_config(self, cfg: Mapping) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        logged = self._client.get_run(self.run_id).data.params  # params can't change: keep a resumed run's
        params = [Param(k, param_value(v, MAX_PARAM_VAL_LENGTH))
                  for k, v in flatten(plain_config(cfg), sep=".").items() if k not in logged]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def log_round(self, row: dict) -> None:
        self._log_metrics(*round_metrics(row))

    def log_summary(self, summary: dict) -> None:
        self._log_metrics(*summary_metrics(summary))
        self._finished = True

    def _log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self) -> None:
        if self._closed:
            return
        for name in ARTIFACTS:
            if (self.run_dir / name).is_file():
                self._client.log_artifact(self.run_id, str(self.run_dir / name))
        self._client.set_terminated(self.run_id, "FINISHED" if self._finished else "FAILED")
        self._closed = True


def param_value(value: Any, limit: int) -> str:
    """A param's text: lists as JSON, cut to MLflow's length limit with '...' to show the cut
    (the whole config is in the config.yaml artifact)."""
    text = json.dumps(value, default=str) if isinstance(value, (list, tuple)) else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
