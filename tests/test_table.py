"""data=table: the user's own rows (JSONL, CSV, Parquet), split by a user column or a partitioner,
and instruction examples whose loss counts the response's tokens only."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fedrun import config, train
from fedrun.cli import app
from fedrun.core import FedrunError
from fedrun.data.examples import IGNORE
from fedrun.data.instructions import EOS_BYTE, Instruction, check_template, encode, from_messages
from fedrun.evaluation import batch_loss, evaluate

USERS = ["ann", "bob", "cy", "dee", "eve"]


def _rows(n: int = 90) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        user = USERS[int(rng.integers(0, len(USERS)))] if i % 7 else "ann"  # uneven users
        rows.append({"user": user, "instruction": f"Greet guest {i} as {user} would.",
                     "output": f"Hello {i}, {user} here!", "topic": ["food", "sport", "art"][i % 3]})
    return rows


@pytest.fixture
def files(tmp_path):
    rows = _rows()
    frame = pd.DataFrame(rows)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    frame.to_csv(tmp_path / "rows.csv", index=False)
    pytest.importorskip("pyarrow", reason="Parquet needs pyarrow (the [data] extra)")
    frame.to_parquet(tmp_path / "rows.parquet")
    return tmp_path


INSTRUCT = ["data=table", "data.prompt_key=instruction", "data.response_key=output", "data.client_key=user",
            "data.seq_len=48", "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "sampler.clients_per_round=2",
            "client.local_steps=2", "client.batch_size=4", "device=cpu", "data.cache=false"]


def _data(path, *extra):
    return config.build_data(config.compose([*INSTRUCT, f"data.path={path}", *extra]))


def test_the_natural_split_is_pandas_groupby_of_the_file(files):
    data = _data(files / "rows.jsonl")
    frame = pd.read_json(files / "rows.jsonl", lines=True)
    sizes = frame.groupby("user").size()
    assert data.client_names() == list(sizes.index)
    held = data.client_sizes("train") + data.client_sizes("test")
    assert held.tolist() == sizes.tolist()


def test_partition_csv_records_each_clients_file_rows_in_each_split(files, tmp_path):
    rows = _rows()
    rows[5]["output"] = ""  # dropped (an empty cell): the other rows keep their numbers in the file
    (tmp_path / "gap.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config.compose([*INSTRUCT, f"data.path={tmp_path / 'gap.jsonl'}", "rounds=1", "data.test_fraction=0.25",
                          "data.seq_len=96",
                          f"run_dir={tmp_path / 'run'}"])
    exp = config.build(cfg)
    run_dir, _ = train.train(exp)
    partition = pd.read_csv(run_dir / "partition.csv", dtype={"train_rows": str, "test_rows": str},
                            keep_default_na=False).set_index("name")
    split = {name: ([int(r) for r in row.train_rows.split()], [int(r) for r in row.test_rows.split()])
             for name, row in partition.iterrows()}
    frame = pd.DataFrame(rows)
    for user, numbers in frame[frame.output != ""].groupby("user").groups.items():
        train_rows, test_rows = split[user]
        assert sorted(train_rows + test_rows) == sorted(numbers)  # every row of the user's, once, by its number
        assert len(test_rows) == partition.loc[user, "test_examples"] == max(1, int(0.25 * len(numbers)))
        assert len(train_rows) == partition.loc[user, "train_examples"]
    client = exp.data.client_names().index("ann")  # the test examples are the test rows' prompts
    test_prompts = {bytes(w.tolist()).split(b"\n")[1].decode() for w in exp.data.clients[client].test.tokens}
    assert test_prompts == {rows[r]["instruction"] for r in split["ann"][1]}
    other = config.build_data(config.compose([*INSTRUCT, f"data.path={tmp_path / 'gap.jsonl'}", "seed=1"]))
    assert other.source_rows is not None and exp.data.source_rows is not None
    assert not np.array_equal(other.source_rows.test, exp.data.source_rows.test)  # the split is seeded


def test_jsonl_csv_and_parquet_give_the_same_partition_and_first_round(files, tmp_path):
    rows = {}
    for fmt in ("jsonl", "csv", "parquet"):
        cfg = config.compose([*INSTRUCT, f"data.path={files / f'rows.{fmt}'}", "rounds=1",
                              f"run_dir={tmp_path / fmt}"])
        run_dir, _ = train.train(config.build(cfg))
        rows[fmt] = (pd.read_csv(run_dir / "partition.csv"),
                     pd.read_csv(run_dir / "metrics.csv").drop(columns=["seconds"]))
    for fmt in ("csv", "parquet"):
        pd.testing.assert_frame_equal(rows[fmt][0], rows["jsonl"][0])
        pd.testing.assert_frame_equal(rows[fmt][1], rows["jsonl"][1])


def test_the_loss_counts_the_response_tokens_only():
    example = Instruction("Name a colour.", "Blue.")
    windows = encode([example], seq_len=64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(256, 8), torch.nn.Linear(8, 256))
    x, y = windows.inputs_targets(torch.device("cpu"))
    loss = batch_loss(model, x, y)
    # independently: find the response in the rendered bytes and average -log p over it and EOS
    text = b"### Instruction:\nName a colour.\n\n### Response:\nBlue." + bytes([EOS_BYTE])
    tokens = torch.tensor(list(text))
    start = text.index(b"Blue.")
    logp = F.log_softmax(model(tokens[:-1].unsqueeze(0))[0], -1)
    expected = -torch.stack([logp[i - 1, tokens[i]] for i in range(start, len(text))]).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert int((y != IGNORE).sum()) == len(b"Blue.") + 1


def test_truncation_keeps_the_response_and_the_end_of_the_prompt():
    long_prompt = "word " * 100 + "LAST"
    windows = encode([Instruction(long_prompt, "the answer")], seq_len=40)
    tokens, mask = windows.tokens[0], windows.mask[0]
    text = bytes(tokens.tolist())
    assert text.endswith(b"### Response:\nthe answer" + bytes([EOS_BYTE]))
    assert bytes(tokens[mask].tolist()) == b"the answer" + bytes([EOS_BYTE])
    # a response too long for the window is cut at its end: the prompt keeps half the window
    short = encode([Instruction("hi", "x" * 100)], seq_len=16)
    assert bytes(short.tokens[0, :8].tolist()) == b"sponse:\n" [-8:] and int(short.mask[0].sum()) == 9
    assert bytes(short.tokens[0, 8:].tolist()) == b"x" * 9


def test_evaluation_is_over_response_tokens():
    windows = encode([Instruction("a", "bc"), Instruction("long prompt here", "d")], seq_len=40)
    model = torch.nn.Sequential(torch.nn.Embedding(256, 8), torch.nn.Linear(8, 256))
    scores = evaluate(model, windows, torch.device("cpu"))
    x, y = windows.inputs_targets(torch.device("cpu"))
    counted = y != IGNORE
    with torch.no_grad():
        ce = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1), reduction="sum") / counted.sum()
    assert scores["eval_loss"] == pytest.approx(float(ce), rel=1e-6)
    assert scores["eval_ppl"] == pytest.approx(math.exp(float(ce)), rel=1e-6)


def test_chats_and_templates():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."}]
    assert from_messages(chat) == Instruction("Hi?", "Hello.", "Be brief.")
    assert from_messages([{"role": "user", "content": "no answer"}]) is None
    windows = encode([from_messages(chat)], seq_len=80, template="Q: {prompt}\nA: {response}")
    assert bytes(windows.tokens[0][windows.tokens[0] != 0].tolist()) == (
        b"### System:\nBe brief.\n\nQ: Hi?\nA: Hello." + bytes([EOS_BYTE]))
    for bad, message in [("{prompt}", "needs {response} exactly once"), ("{response} {prompt}", "must come after"),
                         ("{prompt}{response}{user}", "unknown placeholder {user}")]:
        with pytest.raises(FedrunError, match=message.replace("{", r"\{").replace("}", r"\}")):
            check_template(bad)


def test_a_messages_column_and_a_dirichlet_split(tmp_path):
    rows = [{"chat": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
             "kind": ["x", "y"][i % 2]} for i in range(60)]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = config.build_data(config.compose([
        "data=table", f"data.path={tmp_path / 'chats.jsonl'}", "data.messages_key=chat", "data.partition=dirichlet",
        "data.label_key=kind", "data.num_clients=4", "data.cache=false"]))
    assert data.num_clients >= 2 and int(data.client_sizes().sum() + data.client_sizes("test").sum()) == 60


def test_plain_text_rows_are_language_modelling(tmp_path):
    rows = [{"who": f"u{i % 3}", "body": f"note {i}: " + "the quick brown fox " * 3} for i in range(30)]
    (tmp_path / "notes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = config.build_data(config.compose([
        "data=table", f"data.path={tmp_path / 'notes.jsonl'}", "data.text_key=body", "data.client_key=who",
        "data.seq_len=16", "data.cache=false"]))
    assert data.client_names() == ["u0", "u1", "u2"] and data.clients[0].train.mask is None


def test_vectorized_equals_sequential_on_instruction_data(files, tmp_path):
    tables = {}
    for backend in ("sequential", "vectorized"):
        cfg = config.compose([*INSTRUCT, f"data.path={files / 'rows.jsonl'}", "rounds=2", f"backend={backend}",
                              "client.optimizer=sgd", "client.lr=0.5", "model.dropout=0",
                              f"run_dir={tmp_path / backend}"])
        run_dir, _ = train.train(config.build(cfg))
        tables[backend] = pd.read_csv(run_dir / "metrics.csv")
    for column in ("train_loss", "eval_loss"):
        assert np.allclose(tables["vectorized"][column].dropna(), tables["sequential"][column].dropna(), atol=1e-5)


def test_local_dp_clips_each_instruction_example(files, tmp_path):
    cfg = config.compose([*INSTRUCT, f"data.path={files / 'rows.jsonl'}", "rounds=1", "privacy=local_dp",
                          f"run_dir={tmp_path / 'dp'}"])
    _, summary = train.train(config.build(cfg))
    assert math.isfinite(summary["final"]["eval_loss"]) and summary["privacy"]["epsilon"] > 0


def _bad_inputs(tmp):
    (tmp / "notes.txt").write_text("hello")
    (tmp / "latin1.csv").write_bytes("user,instruction,output\nann,caf\xe9,ok\n".encode("latin-1"))
    (tmp / "empty.jsonl").write_text(json.dumps({"user": "a", "instruction": "", "output": "x"}) + "\n")
    few = _rows(10)
    (tmp / "few.jsonl").write_text("".join(json.dumps(r) + "\n" for r in few))
    return [
        ([f"data.path={tmp / 'missing.jsonl'}"], "data.path: file not found:"),
        ([f"data.path={tmp / 'notes.txt'}"], "is not a .jsonl, .json, .csv, .parquet file"),
        ([f"data.path={tmp / 'few.jsonl'}", "data.prompt_key=question"], "data.prompt_key: 'question' is not a column"),
        ([f"data.path={tmp / 'few.jsonl'}", "data.min_samples=50"], "data.min_samples: no user of 'user' has 50 rows"),
        ([f"data.path={tmp / 'empty.jsonl'}"], "data.path: no row of"),
        ([f"data.path={tmp / 'latin1.csv'}"], "is not UTF-8 text"),
        ([f"data.path={tmp / 'few.jsonl'}", "data.client_key=null"], "data.client_key: partition=natural"),
        ([f"data.path={tmp / 'few.jsonl'}", "data.text_key=output"], "data.text_key: set exactly one of"),
    ]


def test_each_bad_input_is_one_line_and_writes_nothing(tmp_path):
    for overrides, message in _bad_inputs(tmp_path):
        run_dir = tmp_path / "run"
        result = CliRunner().invoke(app, ["train", *INSTRUCT, *overrides, f"run_dir={run_dir}"])
        last = result.output.strip().splitlines()[-1]
        assert result.exit_code == 2 and last.startswith("error: ") and message in last, (overrides, result.output)
        assert not run_dir.exists()


def test_rows_with_empty_cells_are_dropped_and_counted(tmp_path, caplog):
    rows = _rows(40)
    rows[3]["output"] = ""
    rows[5]["instruction"] = None
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING"):
        data = _data(tmp_path / "rows.jsonl")
    assert "2 of 40 rows" in caplog.text
    assert int(data.client_sizes().sum() + data.client_sizes("test").sum()) == 38


@pytest.mark.parametrize("extra", [
    ["privacy=central_dp", "sampler.kind=poisson", "privacy.noise_multiplier=0.5"],
    ["privacy=secure_agg", "sampler.clients_per_round=3"],
    ["compression=topk"],
    ["strategy=scaffold", "client.optimizer=sgd"],
    ["strategy=fedadam", "attack=sign_flip"],
    ["model=hf", "+model.from_config.n_positions=64", "model.from_config.n_embd=16", "model.from_config.n_layer=1"],
], ids=["central_dp", "secure_agg", "topk", "scaffold", "fedadam_attack", "hf_lora"])
def test_instruction_data_works_downstream(files, tmp_path, extra):
    """The masked loss flows through privacy, compression, strategies and LoRA unchanged."""
    base = [o for o in INSTRUCT if not o.startswith("model.")] if "model=hf" in extra else INSTRUCT
    cfg = config.compose([*base, f"data.path={files / 'rows.jsonl'}", "rounds=2", "eval_every=1",
                          f"run_dir={tmp_path / 'run'}", *extra])
    run_dir, _ = train.train(config.build(cfg))
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics["eval_loss"].notna().all() and np.isfinite(metrics["eval_loss"]).all()
    if "privacy=central_dp" not in extra:  # DP noise on five clients may well make it worse
        assert metrics["eval_loss"].iloc[-1] < metrics["eval_loss"].iloc[0]


def test_size_skew_deals_rows_to_power_law_sized_clients(files):
    even = _data(files / "rows.jsonl", "data.partition=iid", "data.num_clients=6", "data.client_key=null")
    skewed = _data(files / "rows.jsonl", "data.partition=iid", "data.num_clients=6", "data.client_key=null",
                   "data.size_skew=1.5", "data.min_samples=1")
    def held(data):
        return data.client_sizes() + data.client_sizes("test")

    assert held(even).max() - held(even).min() <= 1 and held(even).sum() == held(skewed).sum() == 90
    assert held(skewed).max() >= 3 * held(skewed).min()
    with pytest.raises(FedrunError, match="data.size_skew: skews the sizes of partition=iid"):
        _data(files / "rows.jsonl", "data.size_skew=1")


def test_packing_lays_examples_end_to_end_with_their_masks(files, tmp_path):
    plain = _data(files / "rows.jsonl", "data.seq_len=256")
    packed = _data(files / "rows.jsonl", "data.seq_len=256", "data.packing=true")
    assert plain.client_names() == packed.client_names()
    for a, b in zip(plain.clients, packed.clients):
        for split in ("train", "test"):
            x, y = getattr(a, split), getattr(b, split)
            # the same examples in the same order: every token up to each response's end, and the same targets
            ends = [int(m.nonzero().max()) + 1 for m in x.mask]
            content = torch.cat([t[:e] for t, e in zip(x.tokens, ends)])
            content_mask = torch.cat([m[:e] for m, e in zip(x.mask, ends)])
            assert torch.equal(y.tokens.flatten()[: len(content)], content)
            assert torch.equal(y.mask.flatten()[: len(content)], content_mask)
            assert not y.mask.flatten()[len(content):].any() and len(y) == -(-len(content) // 257)
    assert len(packed.clients.train) < len(plain.clients.train)
    cfg = config.compose([*INSTRUCT, f"data.path={files / 'rows.jsonl'}", "data.packing=true", "rounds=1",
                          f"run_dir={tmp_path / 'run'}"])
    run_dir, summary = train.train(config.build(cfg))
    assert math.isfinite(summary["final"]["eval_loss"])
    with pytest.raises(FedrunError, match="data.packing: packs instruction examples"):
        config.build_data(config.compose(["data=table", f"data.path={files / 'rows.jsonl'}", "data.text_key=output",
                                          "data.client_key=user", "data.packing=true"]))
