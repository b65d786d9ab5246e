"""Loggers: what is written is read back with each tool's own reader (TensorBoard's
EventAccumulator, MLflow's client) and compared with what was logged."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from fedrun.core import FedrunError
from fedrun.loggers import MLflowLogger, TensorBoardLogger, flatten, make_loggers

CONFIG = {"name": "fedavg", "rounds": 3, "checkpoint_keep": None, "compile": False,
          "client": {"optimizer": "adam", "lr": 0.003, "local_steps": 10},
          "data": {"_target_": "fedrun.data.text.pystdlib", "sizes": [1, 2]}}
ROWS = [  # round 2 is evaluated; round 3 has no train_loss (no client reported)
    {"round": 1, "train_loss": 4.5, "eval_loss": None, "eval_ppl": None, "eval_acc": None, "bytes_up": 1000},
    {"round": 2, "train_loss": 4.0, "eval_loss": 3.9, "eval_ppl": 49.4, "eval_acc": 0.25, "bytes_up": 1000},
    {"round": 3, "train_loss": None, "eval_loss": 3.8, "eval_ppl": 44.7, "eval_acc": 0.3, "bytes_up": 0,
     "epsilon": 1.5},
]
SUMMARY = {"rounds": 3, "final": {"eval_loss": 3.8, "eval_ppl": 44.7, "eval_acc": 0.3, "round": 3},
           "bytes_up": 2000, "name": "fedavg", "versions": {"torch": "2.x"}, "stopped_at_budget": False}


def expected_history(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Hand-made oracle: per key, (step, value) of every non-None value, the round not a metric."""
    history: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "round" and value is not None:
                history.setdefault(key, []).append((row["round"], float(value)))
    return history


EXPECTED_SUMMARY = {"final/eval_loss": 3.8, "final/eval_ppl": 44.7, "final/eval_acc": 0.3, "final/round": 3.0,
                    "summary/rounds": 3.0, "summary/bytes_up": 2000.0, "summary/stopped_at_budget": 0.0}


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1]}, sep=".") == {"a.b": 1, "a.c.d": None, "e": [1]}


# ---- TensorBoard ---------------------------------------------------------------------------

def read_events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalar_history(acc) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def hparams_data(acc) -> dict:
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    return {tag: HParamsPluginData.FromString(content) for tag, content in acc.PluginTagToContent("hparams").items()}


def as_float32(history: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard stores scalars as float32."""
    return {k: [(s, float(np.float32(v))) for s, v in points] for k, points in history.items()}


def test_tensorboard_round_trip(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.log_config(CONFIG)
    for row in ROWS:
        logger.log_round(row)
    logger.log_summary(SUMMARY)
    logger.close()
    logger.close()  # idempotent

    acc = read_events(tmp_path / "tensorboard")
    expected = expected_history(ROWS) | {k: [(3, v)] for k, v in EXPECTED_SUMMARY.items()}
    assert scalar_history(acc) == as_float32(expected)

    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "    client:\n      optimizer: adam\n      lr: 0.003" in text
    hparams = hparams_data(acc)
    start = hparams["_hparams_/session_start_info"].session_start_info.hparams
    assert {k: v.WhichOneof("kind") for k, v in start.items()} == {
        "name": "string_value", "rounds": "number_value", "compile": "bool_value", "client.optimizer": "string_value",
        "client.lr": "number_value", "client.local_steps": "number_value", "data._target_": "string_value"}
    assert start["client.lr"].number_value == 0.003 and start["client.optimizer"].string_value == "adam"
    from tensorboard.plugins.hparams import api_pb2
    assert hparams["_hparams_/session_end_info"].session_end_info.status == api_pb2.STATUS_SUCCESS


def test_tensorboard_resume_hides_the_crashed_rounds(tmp_path):
    crashed = TensorBoardLogger(tmp_path)
    crashed.log_config(CONFIG)
    for row in ROWS:
        crashed.log_round(row)
    crashed.close()  # no summary: the session ends as failed
    from tensorboard.plugins.hparams import api_pb2
    assert hparams_data(read_events(tmp_path / "tensorboard"))[
        "_hparams_/session_end_info"].session_end_info.status == api_pb2.STATUS_FAILURE

    redone = [{"round": 2, "train_loss": 9.0}, {"round": 3, "train_loss": 8.0}]  # resumed after round 1
    resumed = TensorBoardLogger(tmp_path)
    resumed.log_config(CONFIG)
    for row in redone:
        resumed.log_round(row)
    resumed.close()
    history = scalar_history(read_events(tmp_path / "tensorboard"))
    assert history["train_loss"] == [(1, 4.5), (2, 9.0), (3, 8.0)]
    assert history["bytes_up"] == [(1, 1000.0)]  # rounds 2 and 3 of the crashed run are hidden


# ---- MLflow --------------------------------------------------------------------------------

def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def metric_history(client, run_id: str, keys) -> dict[str, list[tuple[int, float]]]:
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def write_run_files(run_dir: Path) -> None:
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(CONFIG))
    (run_dir / "metrics.csv").write_text("round,train_loss\n1,4.5\n")
    (run_dir / "summary.json").write_text(json.dumps(SUMMARY))


def test_mlflow_round_trip_local_store(tmp_path):
    logger = MLflowLogger(tmp_path, tracking_uri=None, experiment="fedrun-test")
    logger.log_config(OmegaConf.create(CONFIG))  # a DictConfig is accepted as well as a dict
    for row in ROWS:
        logger.log_round(row)
    logger.log_summary(SUMMARY)
    write_run_files(tmp_path)
    logger.close()
    logger.close()

    client = mlflow_client((tmp_path / "mlruns").resolve().as_uri())
    run = client.get_run(logger.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "fedrun-test"
    assert run.info.status == "FINISHED" and run.info.run_name == tmp_path.name
    assert run.data.params == {
        "name": "fedavg", "rounds": "3", "checkpoint_keep": "None", "compile": "False",
        "client.optimizer": "adam", "client.lr": "0.003", "client.local_steps": "10",
        "data._target_": "fedrun.data.text.pystdlib", "data.sizes": "[1, 2]"}
    expected = expected_history(ROWS) | {k: [(3, v)] for k, v in EXPECTED_SUMMARY.items()}
    assert set(run.data.metrics) == set(expected)
    assert metric_history(client, logger.run_id, expected) == expected
    assert {f.path for f in client.list_artifacts(logger.run_id)} == {"config.yaml", "metrics.csv", "summary.json"}


def test_mlflow_tracking_uri_long_params_and_resume(tmp_path):
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    uri = (tmp_path / "store").resolve().as_uri()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = CONFIG | {"notes": "x" * (MAX_PARAM_VAL_LENGTH + 10)}
    crashed = MLflowLogger(run_dir, tracking_uri=uri, experiment="e")
    crashed.log_config(cfg)
    crashed.log_round(ROWS[0])
    crashed.close()
    client = mlflow_client(uri)
    assert not (run_dir / "mlruns").exists()
    assert client.get_run(crashed.run_id).info.status == "FAILED"  # closed without a summary
    notes = client.get_run(crashed.run_id).data.params["notes"]
    assert len(notes) == MAX_PARAM_VAL_LENGTH and notes.endswith("...")

    resumed = MLflowLogger(run_dir, tracking_uri=uri, experiment="e")
    assert resumed.run_id == crashed.run_id
    resumed.log_config(cfg | {"name": "renamed"})  # a param can't change: the first value stays
    resumed.log_round(ROWS[1])
    resumed.log_summary(SUMMARY)
    resumed.close()
    run = client.get_run(resumed.run_id)
    assert run.info.status == "FINISHED" and run.data.params["name"] == "fedavg"
    assert metric_history(client, run.info.run_id, ["train_loss"]) == {"train_loss": [(1, 4.5), (2, 4.0)]}
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_mlflow_sends_no_telemetry(tmp_path):
    """Outside pytest and CI (which MLflow detects itself) its telemetry is on unless switched
    off; here every look-up and connection is recorded and refused."""
    script = textwrap.dedent(f"""
        import socket, time
        from pathlib import Path
        attempts = []
        def refuse(*args, **kwargs):
            attempts.append(args)
            raise OSError("no network in this test")
        socket.getaddrinfo = refuse
        socket.socket.connect = refuse
        from fedrun.loggers import MLflowLogger
        logger = MLflowLogger(Path({str(tmp_path)!r}), tracking_uri=None, experiment="e")
        logger.log_config({{"lr": 0.1}})
        logger.log_round({{"round": 1, "train_loss": 1.0}})
        logger.close()
        from mlflow.telemetry.utils import is_telemetry_disabled
        assert is_telemetry_disabled(), "telemetry is on"
        time.sleep(0.5)  # time for a background sender to try
        assert not attempts, f"network attempted: {{attempts}}"
    """)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ---- building by name ----------------------------------------------------------------------

def test_make_loggers(tmp_path):
    assert make_loggers(["csv"], tmp_path, tracking_uri=None) == []
    loggers = make_loggers(["csv", "tensorboard", "mlflow", "tensorboard"], tmp_path, tracking_uri=None)
    assert [type(lg) for lg in loggers] == [TensorBoardLogger, MLflowLogger]
    for lg in loggers:
        lg.close()


def test_unknown_logger_name(tmp_path):
    with pytest.raises(FedrunError, match=r"logger: unknown 'wandb'; allowed: csv, tensorboard, mlflow"):
        make_loggers(["csv", "wandb"], tmp_path, tracking_uri=None)


@pytest.mark.parametrize("name, module, extra", [("tensorboard", "torch.utils.tensorboard", "tb"),
                                                 ("mlflow", "mlflow", "mlflow")])
def test_missing_package(tmp_path, monkeypatch, name, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(FedrunError, match=rf"logger={name}: needs the .* package: pip install -e \.\[{extra}\]"):
        make_loggers([name], tmp_path, tracking_uri=None)


def test_a_run_sends_every_round_to_tensorboard_and_mlflow(compose_cfg, tmp_path):
    import pandas as pd
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedrun import config, train

    run_dir, _ = train.train(config.build(compose_cfg("logger=[csv,tensorboard,mlflow]", "rounds=3", "eval_every=1",
                                                      f"run_dir={tmp_path / 'logged'}")))
    metrics = pd.read_csv(run_dir / "metrics.csv")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tb = [(e.step, e.value) for e in events.Scalars("eval_loss")]
    assert [s for s, _ in tb] == [0, 1, 2, 3]
    assert [v for _, v in tb] == pytest.approx(metrics["eval_loss"].tolist(), rel=1e-6)
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    history = client.get_metric_history(run.info.run_id, "eval_loss")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]
    assert run.data.params["client.optimizer"] == "adam"
