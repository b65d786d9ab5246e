"""Instruction examples in a tokenizer's chat template (model=hf), and `fedrun generate` on
instruction runs: the prompt read in the run's template, the response alone, ending at EOS."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fedrun import config, generate, train
from fedrun.cli import app
from fedrun.data.instructions import DEFAULT_TEMPLATE, EOS_BYTE, Instruction, encode, prompt_ids, render

SPECIAL = ["<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<eos>"]
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# Its generation prompt is not how it opens an assistant turn: the prompt is no prefix of the chat.
NOT_A_PREFIX = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
USERS = ["ann", "bob", "cy"]

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 deprecations
EXAMPLES = [Instruction("Greet guest 3 as ann would.", "Hello 3, ann here!"),
            Instruction("Greet the fox.", "Hello quick brown fox!", system="Be brief.")]


def _rows(n: int = 30) -> list[dict]:
    return [{"user": USERS[i % 3], "instruction": f"Greet guest {i} as {USERS[i % 3]} would.",
             "output": f"Hello {i}, {USERS[i % 3]} here!"} for i in range(n)]


def _jsonl(path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    return path


def _tokenizer_dir(directory: Path, chat_template: str | None, eos: str = "<|end|>") -> Path:
    """A tiny byte-level BPE tokenizer with EOS and pad tokens (and a chat template), saved locally."""
    pytest.importorskip("transformers", reason="needs the [llm] extra: pip install -e .[llm]")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = " ".join(f"{r['instruction']} {r['output']}" for r in _rows()) + " The quick brown fox. Be brief."
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<pad>")
    fast.chat_template = chat_template
    fast.save_pretrained(directory)
    return directory


def _checkpoint(directory: Path) -> Path:
    """The tokenizer with its chat template and a tiny GPT-2 built from a config (nothing downloaded)."""
    _tokenizer_dir(directory, CHAT)
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    hf = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(hf), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                               bos_token_id=hf.eos_token_id, eos_token_id=hf.eos_token_id)).save_pretrained(directory)
    return directory


def _hf(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def _messages(example: Instruction) -> list[dict[str, str]]:
    system = [{"role": "system", "content": example.system}] if example.system else []
    return [*system, {"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.response}]


def _ids(hf, messages: list[dict], **kwargs) -> list[int]:
    return list(hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs))


# ---- tokenising ------------------------------------------------------------------------------

def test_the_chat_template_tokenises_as_apply_chat_template_and_masks_the_assistant_turn(tmp_path):
    from fedrun.data.text import Tokenizer

    directory = _tokenizer_dir(tmp_path / "tok", CHAT)
    hf, tokenizer = _hf(directory), Tokenizer(str(directory))
    assert tokenizer.has_chat_template
    windows = encode(EXAMPLES, 63, template=None, tokenizer=tokenizer)
    for i, example in enumerate(EXAMPLES):
        whole = _ids(hf, _messages(example))
        prompt = _ids(hf, _messages(example)[:-1], add_generation_prompt=True)
        assert whole[: len(prompt)] == prompt and len(whole) <= 64
        assert windows.tokens[i, : len(whole)].tolist() == whole
        assert not windows.tokens[i, len(whole):].any()
        mask = windows.mask[i].tolist()
        assert mask == [len(prompt) <= j < len(whole) for j in range(64)]
        assert hf.decode(whole[len(prompt):]) == example.response + "<|end|>"


def test_a_multi_turn_chat_keeps_its_turns_and_masks_only_its_last_assistant_turn(tmp_path):
    from fedrun.data.instructions import from_messages
    from fedrun.data.text import Tokenizer

    directory = _tokenizer_dir(tmp_path / "tok", CHAT)
    hf, tokenizer = _hf(directory), Tokenizer(str(directory))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Greet the fox."},
            {"role": "assistant", "content": "Hello fox!"}, {"role": "user", "content": "Greet guest 3."},
            {"role": "assistant", "content": "Hello 3!"}]
    example = from_messages(chat)
    assert example is not None and example.response == "Hello 3!" and example.system == "Be brief."
    assert example.prompt == "user: Greet the fox.\nassistant: Hello fox!\nuser: Greet guest 3."  # the plain template's
    whole, prompt = _ids(hf, chat), _ids(hf, chat[:-1], add_generation_prompt=True)
    windows = encode([example], 127, template=None, tokenizer=tokenizer)
    assert windows.tokens[0, : len(whole)].tolist() == whole
    assert windows.mask[0].tolist() == [len(prompt) <= j < len(whole) for j in range(128)]
    assert hf.decode(whole[len(prompt):]) == "Hello 3!<|end|>"  # the earlier assistant turn is context only
    plain = encode([example], 127, template=DEFAULT_TEMPLATE, tokenizer=None)
    text = render(example)[0].encode()
    assert bytes(plain.tokens[0, : len(text)].tolist()) == text and not plain.mask[0, : len(text)].any()


def test_a_chat_templates_end_of_turn_ends_responses_when_it_is_not_the_eos(tmp_path):
    from fedrun.data.instructions import end_ids
    from fedrun.data.text import Tokenizer

    directory = _tokenizer_dir(tmp_path / "tok", CHAT, eos="<eos>")
    hf, tokenizer = _hf(directory), Tokenizer(str(directory))
    end, eos = hf.convert_tokens_to_ids("<|end|>"), hf.convert_tokens_to_ids("<eos>")
    assert end != eos and end_ids(None, tokenizer) == [eos, end]
    assert end_ids(DEFAULT_TEMPLATE, tokenizer) == [eos]  # a set template ends with the EOS it appends
    assert end_ids(None, None) == [EOS_BYTE]
    hello = hf("Hello 3", add_special_tokens=False)["input_ids"]
    model = Scripted([*hello, end, *hello, eos], vocab=len(hf))
    out = generate.generate_response(model, "Greet guest 3.", template=None, tokenizer=tokenizer, max_new_tokens=50,
                                     temperature=0, top_k=None, seed=0, device="cpu")
    assert out == b"Hello 3" and len(model.inputs) == len(hello) + 1  # nothing sampled after the end of turn
    assert model.inputs[0] == _ids(hf, [{"role": "user", "content": "Greet guest 3."}], add_generation_prompt=True)


def test_a_long_chat_loses_the_start_of_its_prompt(tmp_path):
    from fedrun.data.text import Tokenizer

    directory = _tokenizer_dir(tmp_path / "tok", CHAT)
    hf, tokenizer = _hf(directory), Tokenizer(str(directory))
    example = EXAMPLES[1]
    whole = _ids(hf, _messages(example))
    response = len(whole) - len(_ids(hf, _messages(example)[:-1], add_generation_prompt=True))
    length = 2 * response + 2  # the response fits in what the prompt's half leaves
    assert len(whole) - response > length - response, "the example's prompt must be longer than its share"
    windows = encode([example], length - 1, tokenizer=tokenizer)
    assert windows.tokens[0].tolist() == whole[-length:]
    assert windows.mask[0].tolist() == [False] * (length - response) + [True] * response


def test_without_a_chat_template_the_plain_template_in_the_tokenizers_tokens(tmp_path):
    from fedrun.data.text import Tokenizer

    directory = _tokenizer_dir(tmp_path / "tok", None)
    hf, tokenizer = _hf(directory), Tokenizer(str(directory))
    assert not tokenizer.has_chat_template
    windows = encode(EXAMPLES, 127, template=None, tokenizer=tokenizer)
    for i, example in enumerate(EXAMPLES):
        prompt_text, response_text = render(example, DEFAULT_TEMPLATE)
        prompt = hf(prompt_text, add_special_tokens=False)["input_ids"]
        response = hf(response_text, add_special_tokens=False)["input_ids"] + [hf.eos_token_id]
        assert windows.tokens[i, : len(prompt) + len(response)].tolist() == prompt + response
        assert windows.mask[i].tolist() == [len(prompt) <= j < len(prompt) + len(response) for j in range(128)]


def test_a_set_template_wins_over_the_chat_template(tmp_path):
    from fedrun.data.text import Tokenizer

    directory = _tokenizer_dir(tmp_path / "tok", CHAT)
    tokenizer = Tokenizer(str(directory))
    chat = _tokenizer_dir(tmp_path / "plain", None)
    got = encode(EXAMPLES, 63, template="Q: {prompt}\nA: {response}", tokenizer=tokenizer)
    want = encode(EXAMPLES, 63, template="Q: {prompt}\nA: {response}", tokenizer=Tokenizer(str(chat)))
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.mask, want.mask)


def test_a_chat_template_whose_prompt_is_no_prefix_falls_back_with_a_warning(tmp_path, caplog):
    from fedrun.data.text import Tokenizer

    tokenizer = Tokenizer(str(_tokenizer_dir(tmp_path / "tok", NOT_A_PREFIX)))
    plain = Tokenizer(str(_tokenizer_dir(tmp_path / "plain", None)))
    with caplog.at_level(logging.WARNING, logger="fedrun.data.instructions"):
        got = encode(EXAMPLES, 63, tokenizer=tokenizer)
    assert "plain template" in caplog.text
    want = encode(EXAMPLES, 63, tokenizer=plain)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.mask, want.mask)


def test_bytes_read_the_plain_template_as_before():
    windows = encode(EXAMPLES[:1], 80)
    assert torch.equal(windows.tokens, encode(EXAMPLES[:1], 80, template=DEFAULT_TEMPLATE).tokens)
    text = b"### Instruction:\nGreet guest 3 as ann would.\n\n### Response:\n"
    ids = text + b"Hello 3, ann here!" + bytes([EOS_BYTE])
    assert bytes(windows.tokens[0, : len(ids)].tolist()) == ids
    assert windows.mask[0].tolist() == [len(text) <= j < len(ids) for j in range(81)]
    assert bytes(prompt_ids("Greet guest 3 as ann would.", template=None, tokenizer=None)) == text


# ---- a model=hf run on a table of instructions ------------------------------------------------

def test_a_model_with_a_chat_template_trains_on_it_and_answers_in_it(tmp_path):
    pytest.importorskip("peft", reason="model=hf's LoRA needs the [llm] extra: pip install -e .[llm]")
    directory = _checkpoint(tmp_path / "ckpt")
    cfg = config.compose(["data=table", f"data.path={_jsonl(tmp_path / 'rows.jsonl')}", "data.prompt_key=instruction",
                          "data.response_key=output", "data.client_key=user", "data.seq_len=32", "data.cache=false",
                          "model=hf", f"model.name_or_path={directory}", "model.from_config=null", "model.lora.r=2",
                          "sampler.clients_per_round=2", "client.local_steps=1", "client.batch_size=4", "rounds=1",
                          "device=cpu", f"run_dir={tmp_path / 'run'}"])
    exp = config.build(cfg)
    hf = _hf(directory)
    assert exp.data.fingerprint["template"].startswith("chat template sha256:")  # what the examples were rendered with
    first = exp.data.clients[0]  # ann: rows 0, 3, ...; its examples are chats in the template's tokens
    window = torch.cat([first.train.tokens, first.test.tokens])[0].tolist()
    assert window[0] == hf.convert_tokens_to_ids("<|user|>") and hf.eos_token_id in window
    run_dir, _ = train.train(exp)
    assert (run_dir / "model.safetensors").is_file()

    model, run_cfg = generate.load_model(run_dir, device="cpu")
    ids = _ids(hf, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert prompt_ids("Hi", template=None, tokenizer=generate.run_tokenizer(run_cfg)) == ids
    with torch.no_grad():  # a hand greedy loop from the generation prompt, to the EOS or 5 tokens
        new: list[int] = []
        while len(new) < 5 and hf.eos_token_id not in new:
            new.append(int(model(torch.tensor([ids + new]))[0, -1].argmax()))
    new = [i for i in new if i != hf.eos_token_id]
    out = CliRunner().invoke(app, ["generate", str(run_dir), "--prompt", "Hi", "--max-new-tokens", "5",
                                   "--temperature", "0"])
    assert out.exit_code == 0, out.output
    assert out.output == hf.decode(new) + "\n"


# ---- generate on a byte-level instruction run -------------------------------------------------

class Scripted(nn.Module):
    """A stand-in model that writes `script` (bytes, or ids below `vocab`) greedily, one token per
    call, and records its inputs."""

    def __init__(self, script: bytes | list[int], seq_len: int = 200, vocab: int = 256):
        super().__init__()
        self.script, self.seq_len, self.vocab, self.inputs = list(script), seq_len, vocab, []
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.inputs.append(idx[0].tolist())
        logits = torch.zeros(1, idx.shape[1], self.vocab)
        logits[0, -1, self.script[len(self.inputs) - 1]] = 1.0
        return logits


def test_generate_response_reads_the_template_and_stops_at_eos():
    model = Scripted(b"Hi there\x04### Instruction:")
    out = generate.generate_response(model, "Say hi", template=None, tokenizer=None, max_new_tokens=50,
                                     temperature=0, top_k=None, seed=0, device="cpu")
    assert out == b"Hi there"
    assert bytes(model.inputs[0]) == b"### Instruction:\nSay hi\n\n### Response:\n"
    assert len(model.inputs) == len(b"Hi there\x04")  # nothing sampled after the EOS
    model = Scripted(b"yes\n--\x04")
    out = generate.generate_response(model, "Ok?", template="Q: {prompt}\nA: {response}\n--", tokenizer=None,
                                     max_new_tokens=50, temperature=0, top_k=None, seed=0, device="cpu")
    assert out == b"yes" and bytes(model.inputs[0]) == b"Q: Ok?\nA: "


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("instruct")
    cfg = config.compose(["data=table", f"data.path={_jsonl(root / 'rows.jsonl')}", "data.prompt_key=instruction",
                          "data.response_key=output", "data.client_key=user", "data.seq_len=64", "data.cache=false",
                          "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "sampler.clients_per_round=2",
                          "client.local_steps=2", "client.batch_size=4", "rounds=1", "device=cpu",
                          f"run_dir={root / 'run'}"])
    return train.train(config.build(cfg))[0]


def test_generate_on_a_byte_instruction_run_prints_only_the_response(byte_run, monkeypatch):
    args = ["generate", str(byte_run), "--prompt", "Greet guest 4 as bob would.", "--max-new-tokens", "40",
            "--temperature", "0"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "### " not in out.output and "\x04" not in out.output
    assert not out.output.startswith("Greet guest 4")
    raw = CliRunner().invoke(app, [*args, "--raw"])
    assert raw.exit_code == 0 and raw.output.startswith("Greet guest 4 as bob would.")

    # The run's own model rarely writes its EOS after one round: a scripted one shows where it stops.
    cfg = generate.load_model(byte_run, device="cpu")[1]
    monkeypatch.setattr(generate, "load_model", lambda *a, **k: (Scripted(b"Hello 4, bob!\x04### Instruction:"),
                                                                 cfg))
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert out.output == "Hello 4, bob!\n"
