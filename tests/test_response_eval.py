"""Evaluation beyond perplexity (fedrun/response_eval.py): multiple-choice accuracy by
log-likelihood against a hand-written oracle, greedy responses in samples.jsonl, the refusals,
and a resumed run's samples.jsonl equal to an uninterrupted run's."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fedrun import config, run_config, train
from fedrun.core import FedrunError
from fedrun.data.examples import Windows
from fedrun.data.instructions import DEFAULT_TEMPLATE, EOS_BYTE, Instruction, encode, render
from fedrun.response_eval import ChoiceRow, MultipleChoice, SampleResponses, greedy, read_choices
from fedrun.rundir import JsonLines

CPU = torch.device("cpu")


class ToyLM(nn.Module):
    """Byte logits W[token] + P[position]: fixed weights, and positions beyond seq_len fail."""

    def __init__(self, seq_len: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.seq_len = seq_len
        self.w = torch.randn(256, 256, generator=g, dtype=torch.float64) * 3
        self.p = torch.randn(seq_len, 256, generator=g, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, 256)
        return self.w[x] + self.p[: x.shape[1]]


def _oracle_loglik(model: ToyLM, context: bytes, choice: bytes, seq_len: int) -> float:
    """lm-evaluation-harness: inputs (ctx + cont)[-(L + 1):][:-1], the continuation's log-probs summed."""
    ids = list(context + choice)[-(seq_len + 1):]
    w, p = model.w.numpy(), model.p.numpy()
    total = 0.0
    for t in range(len(ids) - len(choice), len(ids)):
        logits = w[ids[t - 1]] + p[t - 1]
        total += logits[ids[t]] - (np.log(np.exp(logits - logits.max()).sum()) + logits.max())
    return total


def _rows(n: int = 24, seed: int = 1) -> list[ChoiceRow]:
    rng = np.random.default_rng(seed)
    words = ["a", "bee", "cat", "dogs", "eagle", "falcon", "ok", "zebra crossing"]
    return [ChoiceRow(f"Question {i}: which?", tuple(rng.choice(words, size=4, replace=False).tolist()),
                      int(rng.integers(0, 4))) for i in range(n)]


@pytest.mark.parametrize("seq_len", [64, 12])  # 12: questions are cut from the left to fit
def test_multiple_choice_accuracy_is_the_argmax_of_the_log_likelihoods(seq_len):
    model, rows = ToyLM(seq_len), _rows()
    got = MultipleChoice(rows, template=DEFAULT_TEMPLATE, seq_len=seq_len).evaluate(
        model, CPU, round_idx=0, run_dir=None)
    picks, picks_norm = [], []
    for row in rows:
        context = render(Instruction(row.question, ""))[0].encode()
        scores = np.array([_oracle_loglik(model, context, c.encode(), seq_len) for c in row.choices])
        picks.append(int(np.argmax(scores)))
        picks_norm.append(int(np.argmax(scores / [len(c.encode()) for c in row.choices])))
    assert picks != picks_norm  # the two metrics differ on these rows, so each is tested
    answers = [row.answer for row in rows]
    assert got["eval_mc_acc"] == pytest.approx(np.mean(np.equal(picks, answers)))
    assert got["eval_mc_acc_norm"] == pytest.approx(np.mean(np.equal(picks_norm, answers)))


def _choices_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(("row", "words"), [
    ({"question": "q", "choices": ["a", "b"]}, "needs the fields question, choices and answer"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "answer 2 is not an index of choices; allowed: 0..1"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "choices is not a list of at least 2 non-empty strings"),
])
def test_a_bad_choices_file_is_one_line_naming_eval_choices(tmp_path, row, words):
    good = {"question": "q", "choices": ["a", "b"], "answer": 1}
    path = _choices_file(tmp_path / "mc.jsonl", [good, row])
    with pytest.raises(FedrunError) as e:
        read_choices(str(path))
    assert str(e.value) == f"eval.choices: {path} line 2: {words}"
    with pytest.raises(FedrunError, match=r"^eval.choices: file not found: .*nope.jsonl$"):
        read_choices(str(tmp_path / "nope.jsonl"))


# ---- eval.samples ------------------------------------------------------------------------------

def test_greedy_stops_at_eos_or_after_max_new_tokens():
    model = ToyLM(16)
    model.p.zero_()
    model.w.zero_()
    model.w[ord("H"), ord("i")] = model.w[ord("i"), EOS_BYTE] = 1  # H -> i -> EOS
    model.w[ord("a"), ord("a")] = 1  # a -> a -> ...
    assert greedy(model, list(b"xH"), ends=[EOS_BYTE], max_new_tokens=10, device=CPU) == [ord("i")]
    assert greedy(model, list(b"a"), ends=[EOS_BYTE], max_new_tokens=20, device=CPU) == [ord("a")] * 20


def test_sample_responses_write_the_decoded_prompt_reference_and_response(tmp_path):
    model = ToyLM(64)
    model.p.zero_()
    model.w.zero_()
    model.w[ord("\n"), 0xC3] = model.w[0xC3, 0xA9] = model.w[0xA9, EOS_BYTE] = 1  # "\n" -> "é" -> EOS
    examples = [Instruction(f"Say {i}", f"Answer {i}") for i in range(5)]
    windows = encode(examples, 63)
    responses = SampleResponses(windows, samples=3, seed=0, max_new_tokens=31)
    for round_idx in (0, 5):
        assert responses.evaluate(model, CPU, round_idx=round_idx, run_dir=tmp_path) == {}
    lines = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 0, 0, 5, 5, 5]
    assert [line["prompt"] for line in lines[:3]] == [line["prompt"] for line in lines[3:]]  # fixed prompts
    for line in lines:
        assert list(line) == ["round", "prompt", "reference", "response"]
        i = int(line["reference"].removeprefix("Answer "))
        assert line["prompt"] == render(examples[i])[0] and line["response"] == "é"
    assert len({line["prompt"] for line in lines}) == 3


def _instruction_rows(path, n=60):
    users = ["ann", "bob", "cy"]
    rows = [{"user": users[i % 3], "instruction": f"Greet guest {i}.", "output": f"Hello {i}!"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _instruct(tmp_path, *extra, rounds=2, name="run"):
    data = _instruction_rows(tmp_path / "rows.jsonl")
    return config.compose([
        "data=table", f"data.path={data}", "data.prompt_key=instruction", "data.response_key=output",
        "data.client_key=user", "data.seq_len=40", "data.cache=false", "model.n_layer=1", "model.n_head=2",
        "model.n_embd=16", "sampler.clients_per_round=2", "client.local_steps=2", "client.batch_size=4",
        "device=cpu", f"rounds={rounds}", "eval_every=1", f"run_dir={tmp_path / name}", *extra])


def _samples(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def test_an_instruction_run_writes_samples_at_each_evaluation(tmp_path):
    run_dir, _ = train.train(config.build(_instruct(tmp_path, "eval.samples=3", "eval_every=2", rounds=3)))
    lines = _samples(run_dir)
    assert [line["round"] for line in lines] == [0] * 3 + [2] * 3 + [3] * 3
    assert all(line["prompt"].endswith("### Response:\n") and line["reference"].startswith("Hello ")
               and isinstance(line["response"], str) for line in lines)
    assert len({line["prompt"] for line in lines}) == 3
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert not any(c.startswith("eval_mc") for c in metrics.columns)  # only with eval.choices


def test_eval_samples_needs_instruction_data_and_a_global_model(compose_cfg, tmp_path):
    with pytest.raises(FedrunError, match=r"^eval.samples: responses are sampled from held-out instruction"):
        config.build(compose_cfg("eval.samples=2"))
    with pytest.raises(FedrunError, match=r"^eval.samples: strategy=fed_distill has no global model"):
        compose_cfg("strategy=fed_distill", "eval.samples=2")
    with pytest.raises(FedrunError, match=r"^eval.choices: responses and multiple-choice answers need text data"):
        config.compose(["data=synthetic", "model=logreg", "eval.choices=x.jsonl"])
    with pytest.raises(FedrunError, match=r"^eval.samples: -1 is not allowed; allowed: an integer >= 0$"):
        compose_cfg("eval.samples=-1")


def test_eval_choices_on_plain_text_adds_its_columns(compose_cfg, tmp_path):
    path = _choices_file(tmp_path / "mc.jsonl", [{"question": "Who?", "choices": ["thou", "the king"], "answer": 1}])
    run_dir, _ = train.train(config.build(compose_cfg(f"eval.choices={path}")))
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics[["eval_mc_acc", "eval_mc_acc_norm"]].notna().all().all()
    assert set(metrics.eval_mc_acc) <= {0.0, 1.0}


def test_a_resumed_run_writes_each_round_once(tmp_path):
    mc = _choices_file(tmp_path / "mc.jsonl", [{"question": "Greet guest 1.", "choices": ["Hello 1!", "Bye"],
                                                "answer": 0}])
    extra = ("eval.samples=2", f"eval.choices={mc}", "checkpoint_every=2")
    whole_dir, _ = train.train(config.build(_instruct(tmp_path, *extra, rounds=4, name="whole")))

    def stop_after_3(row):
        if row["round"] == 3:  # samples of round 3 are written, the checkpoint is round 2's
            raise KeyboardInterrupt

    with pytest.raises(train.RunInterrupted):
        train.train(config.build(_instruct(tmp_path, *extra, rounds=4, name="cut")), on_round=stop_after_3)
    cut = tmp_path / "cut"
    assert [line["round"] for line in _samples(cut)] == [0, 0, 1, 1, 2, 2, 3, 3]
    train.resume(*train.load_for_resume(cut))
    assert (cut / "samples.jsonl").read_bytes() == (whole_dir / "samples.jsonl").read_bytes()
    pd.testing.assert_frame_equal(pd.read_csv(cut / "metrics.csv").drop(columns="seconds"),
                                  pd.read_csv(whole_dir / "metrics.csv").drop(columns="seconds"), check_exact=True)


def test_truncate_after_drops_later_rounds_and_a_torn_line(tmp_path):
    lines = JsonLines(tmp_path / "samples.jsonl")
    lines.append([{"round": r, "response": "é"} for r in (0, 1, 2)])
    with open(lines.path, "a") as f:
        f.write('{"round": 1, "resp')  # a crash mid-line
    lines.truncate_after(1)
    assert [json.loads(line)["round"] for line in lines.path.read_text().splitlines()] == [0, 1]
    JsonLines(tmp_path / "absent.jsonl").truncate_after(0)
    assert not (tmp_path / "absent.jsonl").exists()


def test_a_run_directory_without_an_eval_node_still_loads(compose_cfg):
    cfg = compose_cfg("rounds=1")
    run_dir, _ = train.train(config.build(cfg))
    tree = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    del tree["eval"]
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(tree))
    loaded = run_config.load_run_config(run_dir)
    assert loaded.eval.samples == 0 and loaded.eval.choices is None


def test_windows_without_a_mask_are_refused():
    with pytest.raises(FedrunError, match="^eval.samples:"):
        SampleResponses(Windows(torch.zeros(3, 9, dtype=torch.uint8)), samples=1, seed=0, max_new_tokens=8)


# ---- report ------------------------------------------------------------------------------------

def test_the_html_report_shows_samples_per_round_and_the_table_mc_accuracy(tmp_path):
    from fedrun.report.html import samples_section
    from fedrun.report.runs import results

    assert samples_section(tmp_path) == ""  # no samples.jsonl: no section
    JsonLines(tmp_path / "samples.jsonl").append(
        [{"round": r, "prompt": f"p{r}<b>", "reference": "ref", "response": f"answer {r}"} for r in (0, 0, 4)])
    with open(tmp_path / "samples.jsonl", "a") as f:
        f.write('{"round": 9, "pro')  # torn
    html = samples_section(tmp_path)
    assert html.count("<h5>Round") == 2 and "Round 9" not in html
    assert html.index("Round 0") < html.index("p0&lt;b&gt;") < html.index("Round 4") < html.index("answer 4")
    metrics = pd.DataFrame({"round": [0, 1, 2], "eval_mc_acc": [0.25, None, 0.5]})
    assert results(metrics, {})["final_eval_mc_acc"] == 0.5
    assert np.isnan(results(metrics.drop(columns="eval_mc_acc"), {})["final_eval_mc_acc"])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 deprecations
def test_a_model_hf_run_with_a_chat_template_samples_and_scores_in_its_tokens(tmp_path):
    pytest.importorskip("peft", reason="model=hf's LoRA needs the [llm] extra: pip install -e .[llm]")
    from tests.test_chat_template import _checkpoint, _hf

    directory = _checkpoint(tmp_path / "ckpt")
    mc = _choices_file(tmp_path / "mc.jsonl", [{"question": "Greet guest 1 as bob would.",
                                                "choices": ["Hello 1, bob here!", "Bye"], "answer": 0}])
    cfg = config.compose(["data=table", f"data.path={_instruction_rows(tmp_path / 'rows.jsonl')}",
                          "data.prompt_key=instruction", "data.response_key=output", "data.client_key=user",
                          "data.seq_len=24", "data.cache=false", "model=hf", f"model.name_or_path={directory}",
                          "model.from_config=null", "model.lora.r=2", "sampler.clients_per_round=2",
                          "client.local_steps=1", "client.batch_size=4", "rounds=1", "device=cpu",
                          "eval.samples=2", f"eval.choices={mc}", f"run_dir={tmp_path / 'run'}"])
    exp = config.build(cfg)
    choices = exp.server_model.evals[0]
    hf = _hf(directory)
    assert choices.sequences[0][0][0] == hf.convert_tokens_to_ids("<|user|>")  # the chat template's prompt
    run_dir, _ = train.train(exp)
    lines = _samples(run_dir)
    assert [line["round"] for line in lines] == [0, 0, 1, 1]
    assert all(line["prompt"].endswith("<|assistant|>") and line["reference"].startswith("Hello ") for line in lines)
    assert pd.read_csv(run_dir / "metrics.csv")["eval_mc_acc"].notna().all()
