"""HFCausalLM: tiny transformers models built from a config (nothing downloaded), LoRA via peft."""
from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("transformers", reason="needs the [llm] extra: pip install -e .[llm]")
peft = pytest.importorskip("peft", reason="needs the [llm] extra: pip install -e .[llm]")

from fedrun.client import ClientConfig, LocalTrainer  # noqa: E402
from fedrun.core import ClientJob, FedrunError, RoundContext  # noqa: E402
from fedrun.data.examples import ClientData, Windows  # noqa: E402
from fedrun.evaluation import batch_loss  # noqa: E402
from fedrun.models.hf import HFCausalLM, LoRAConfig, lora_aggregation_error, lora_pairs  # noqa: E402
from fedrun.params import flatten_parameters  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread")]

GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64}
LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
         "num_attention_heads": 2, "num_key_value_heads": 1}
LORA = LoRAConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=None)
NO_LORA = dataclasses.replace(LORA, enabled=False)
SEQ_LEN = 16



def build(from_config=GPT2, lora=LORA, init_seed=0, **kwargs) -> HFCausalLM:
    args = {"vocab_size": 256, "seq_len": SEQ_LEN, "name_or_path": None, "from_config": from_config,
            "lora": lora, "init_seed": init_seed, **kwargs}
    return HFCausalLM(**args)


def tokens(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def base_state(model: HFCausalLM) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


def lora_size_closed_form(cfg: dict, r: int) -> int:
    """r * (in + out) per adapted module, from the architecture's dimensions."""
    if cfg["model_type"] == "gpt2":  # c_attn: Conv1D n_embd -> 3 n_embd
        return cfg["n_layer"] * r * (cfg["n_embd"] + 3 * cfg["n_embd"])
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    q = cfg["hidden_size"] + cfg["num_attention_heads"] * head_dim  # q_proj: hidden -> heads * head_dim
    v = cfg["hidden_size"] + cfg["num_key_value_heads"] * head_dim  # v_proj: hidden -> kv_heads * head_dim
    return cfg["num_hidden_layers"] * r * (q + v)


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
@pytest.mark.parametrize("lora", [LORA, NO_LORA], ids=["lora", "full"])
def test_forward_shape(cfg, lora):
    model = build(cfg, lora)
    assert model.seq_len == SEQ_LEN
    assert model(tokens()).shape == (3, SEQ_LEN, 256)


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_only_adapters_train_and_their_size_is_the_closed_form(cfg):
    model = build(cfg)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert sum(p.numel() for p in trainable.values()) == lora_size_closed_form(cfg, LORA.r)
    assert flatten_parameters(model).numel() == lora_size_closed_form(cfg, LORA.r)


def test_without_lora_everything_trains():
    model = build(lora=NO_LORA)
    assert all(p.requires_grad for p in model.parameters())
    assert flatten_parameters(model).numel() == sum(p.numel() for p in model.parameters())


def test_target_modules_override():
    model = build(LLAMA, dataclasses.replace(LORA, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert len(lora_pairs(model)) == 4 * LLAMA["num_hidden_layers"]


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_base_depends_on_init_seed_not_on_global_rng(cfg):
    torch.manual_seed(1)
    a = build(cfg, init_seed=7)
    torch.manual_seed(2)
    torch.rand(5)
    b = build(cfg, init_seed=7)
    c = build(cfg, init_seed=8)
    sa, sb, sc = base_state(a), base_state(b), base_state(c)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    # Adapters come from the caller's RNG: different here, and B = 0 so the output is the base's.
    a_a = [p for n, p in a.named_parameters() if "lora_A" in n]
    a_b = [p for n, p in b.named_parameters() if "lora_A" in n]
    assert any(not torch.equal(x, y) for x, y in zip(a_a, a_b))
    x = tokens()
    torch.testing.assert_close(a.eval()(x), b.eval()(x))  # eval: GPT-2's config has dropout


def train_step(model: HFCausalLM, lr: float = 0.5, seed: int = 0) -> None:
    window = tokens(batch=4, seed=seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch_loss(model, window[:, :-1], window[:, 1:]).backward()
    opt.step()


def test_sgd_step_changes_only_adapters():
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)
    # With B = 0 at init, A's gradient is zero at the first step: only B moves.
    assert all("lora_B" in k for k in changed)


def test_save_adapter_loads_in_peft(tmp_path):
    torch.manual_seed(0)
    model = build()
    flatten_parameters(model)  # as in fedrun: parameters are views of one flat buffer
    train_step(model)
    train_step(model, seed=1)
    model.save_adapter(tmp_path)
    base = build(lora=NO_LORA).model  # the same base: same init_seed
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    x = tokens()
    model.eval()
    torch.testing.assert_close(loaded(input_ids=x).logits[..., :256], model(x))


def test_pretrained_directory(tmp_path):
    """A local checkpoint with a larger vocabulary: bytes index it, logits are cut to 256."""
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(vocab_size=300, n_positions=32, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = build(from_config=None, name_or_path=str(tmp_path))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model.eval()
    x = tokens()
    torch.testing.assert_close(model(x), reference(input_ids=x).logits[..., :256])


def test_pretrained_directory_too_short_for_seq_len(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(vocab_size=256, n_positions=8, n_layer=1, n_head=2, n_embd=32)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(FedrunError, match="positions"):
        build(from_config=None, name_or_path=str(tmp_path))


def test_missing_directory_is_a_user_error(tmp_path):
    with pytest.raises(FedrunError, match="model.name_or_path: directory not found: .*never downloads"):
        build(from_config=None, name_or_path=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("source", [{"name_or_path": None, "from_config": None},
                                    {"name_or_path": "x", "from_config": GPT2}])
def test_exactly_one_source(source):
    with pytest.raises(FedrunError, match="exactly one"):
        build(**source)


def test_unknown_model_type_and_targets_are_user_errors():
    with pytest.raises(FedrunError, match="model.from_config"):
        build({"model_type": "no_such_model"})
    with pytest.raises(FedrunError, match="model.lora.target_modules"):
        build({"model_type": "gpt_neo", "num_layers": 1, "attention_types": [[["global"], 1]],
               "hidden_size": 32, "num_heads": 2})


def test_hydra_configs_are_accepted():
    model = build(OmegaConf.create(LLAMA), OmegaConf.create(dataclasses.asdict(LORA) | {"target_modules": ["q_proj"]}))
    assert len(lora_pairs(model)) == LLAMA["num_hidden_layers"]


def test_aggregation_error_is_zero_for_identical_clients():
    model = build()
    flat = flatten_parameters(model)
    flat.add_(torch.randn(flat.shape, generator=torch.Generator().manual_seed(0)))
    assert lora_aggregation_error([flat.clone()] * 3, model) == pytest.approx(0.0, abs=1e-12)


def test_aggregation_error_matches_numpy():
    model = build()
    flat = flatten_parameters(model)
    g = torch.Generator().manual_seed(0)
    clients = [torch.randn(flat.shape, generator=g) for _ in range(2)]
    # Oracle: slice each client's vector by hand, in the order of the trainable parameters.
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    ends = np.cumsum([int(np.prod(s)) for s in shapes])
    per_client = [dict(zip(names, (v.numpy()[e - int(np.prod(s)) : e].reshape(s) for s, e in zip(shapes, ends))))
                  for v in clients]
    errors = []
    for name in (n for n in names if "lora_A" in n):
        a = [c[name] for c in per_client]
        b = [c[name.replace("lora_A", "lora_B")] for c in per_client]
        exact = np.mean([bi @ ai for ai, bi in zip(a, b)], axis=0)
        approx = np.mean(b, axis=0) @ np.mean(a, axis=0)
        errors.append(np.linalg.norm(exact - approx) / np.linalg.norm(exact))
    assert len(errors) == GPT2["n_layer"]
    assert lora_aggregation_error(clients, model) == pytest.approx(np.mean(errors), rel=1e-5)


def test_local_trainer_trains_the_flat_adapter_vector():
    """fedrun's own client loop, unchanged, on a LoRA model: the update is the adapters only."""
    make_model = partial(HFCausalLM, vocab_size=256, seq_len=SEQ_LEN, name_or_path=None, from_config=GPT2,
                         lora=LORA, init_seed=0)
    torch.manual_seed(0)
    global_model = make_model()
    weights = flatten_parameters(global_model).detach().clone()
    text = np.frombuffer(b"to be or not to be, that is the question. " * 20, dtype=np.uint8)
    starts = range(0, len(text) - SEQ_LEN - 1, 7)
    windows = Windows(torch.from_numpy(np.stack([text[s : s + SEQ_LEN + 1] for s in starts]).copy()))
    data = ClientData(name="c0", train=windows, test=windows)
    cfg = ClientConfig(optimizer="adam", lr=1e-2, momentum=0.0, weight_decay=0.0, batch_size=8,
                       local_epochs=None, local_steps=30)
    trainer = LocalTrainer(make_model, cfg, torch.device("cpu"))
    update = trainer.train(ClientJob(client_id=0), data, weights, RoundContext(round_idx=1, seed=0, num_clients=1))
    assert update.delta.shape == weights.shape == (lora_size_closed_form(GPT2, LORA.r),)
    assert update.delta.abs().sum() > 0
    x, y = windows.inputs_targets(torch.device("cpu"))
    with torch.no_grad():
        before = batch_loss(global_model.eval(), x, y)
        flatten_parameters(global_model).copy_(weights + update.delta)
        after = batch_loss(global_model, x, y)
    assert after < before - 0.2


@pytest.mark.parametrize("privacy", [[], ["privacy=central_dp", "sampler.kind=poisson", "privacy.noise_multiplier=0.5"],
                                     ["privacy=local_dp"]])
def test_lora_federated_runs_exchange_only_adapters(privacy, compose_cfg, tmp_path):
    import json

    import pandas as pd

    from fedrun import config, train

    exp = config.build(compose_cfg("model=hf", "model.from_config.n_embd=16", "model.from_config.n_layer=1",
                                   "model.lora.r=2", "rounds=2", "data.seq_len=16", "data.min_samples=4",
                                   "sampler.clients_per_round=3", *privacy, f"run_dir={tmp_path / 'lora'}", tiny=False))
    model = exp.make_model()
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapters == 1 * 2 * (16 + 3 * 16)  # r (in + out) for GPT-2's c_attn, one layer
    run_dir, summary = train.train(exp)
    m = pd.read_csv(run_dir / "metrics.csv").iloc[1:]
    assert (m["bytes_up"] == m["reported"] * adapters * 4).all()  # only the adapters travel
    assert m["lora_agg_error"].notna().any() and (m["lora_agg_error"].dropna() >= 0).all()
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    if privacy:
        assert summary["privacy"]["epsilon"] > 0
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] == 2


def _local_checkpoint(directory, text: str):
    """A tiny GPT-2 with its own byte-level BPE tokenizer, saved as a local HF checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=320,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.save_pretrained(directory)
    config = GPT2Config(vocab_size=len(fast), n_positions=32, n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return fast


def test_a_local_checkpoint_trains_on_its_own_tokens(play, tmp_path):
    import pandas as pd

    from fedrun import config, train
    from fedrun.data.shakespeare import read_shakespeare
    from fedrun.data.text import windows

    tokenizer = _local_checkpoint(tmp_path / "ckpt", play.read_text())
    cfg = config.compose(["model=hf", f"model.name_or_path={tmp_path / 'ckpt'}", "model.from_config=null",
                          "model.lora.r=2", "data=shakespeare", f"data.path={play}", "data.seq_len=16",
                          "data.min_samples=2", "sampler.clients_per_round=3", "rounds=2", "device=cpu",
                          f"run_dir={tmp_path / 'run'}"])
    exp = config.build(cfg)
    assert exp.data.model_dims["vocab_size"] == len(tokenizer)
    docs, _ = read_shakespeare(str(play))
    first = dict(docs)[exp.data.clients[0].name]
    ids = tokenizer(first.decode(), add_special_tokens=False)["input_ids"]
    expected = windows(first, 16, encode=lambda _: ids)
    got = torch.cat([exp.data.clients[0].train.tokens, exp.data.clients[0].test.tokens])
    assert torch.equal(got, expected) and int(got.max()) < len(tokenizer)
    run_dir, _ = train.train(exp)
    m = pd.read_csv(run_dir / "metrics.csv")
    assert m["eval_loss"].iloc[-1] < m["eval_loss"].iloc[0]


def test_generate_from_a_tokenized_run_decodes_its_own_tokens(play, tmp_path):
    from typer.testing import CliRunner

    from fedrun.cli import app

    _local_checkpoint(tmp_path / "ckpt", play.read_text())
    result = CliRunner().invoke(app, ["train", "model=hf", f"model.name_or_path={tmp_path / 'ckpt'}",
                                      "model.from_config=null", "data=shakespeare", f"data.path={play}",
                                      "data.seq_len=16", "data.min_samples=2", "sampler.clients_per_round=3",
                                      "rounds=1", "device=cpu", f"run_dir={tmp_path / 'run'}"])
    assert result.exit_code == 0, result.output
    out = CliRunner().invoke(app, ["generate", str(tmp_path / "run"), "--prompt", "SPEAKER A:",
                                   "--max-new-tokens", "5", "--temperature", "0"])
    assert out.exit_code == 0, out.output
    assert out.output.startswith("SPEAKER A:") and len(out.output) > len("SPEAKER A:")


def test_an_exported_run_is_a_checkpoint_that_starts_where_the_run_ended(compose_cfg, tmp_path):
    import pandas as pd
    from typer.testing import CliRunner

    from fedrun import config, train
    from fedrun.cli import app

    small = ["model=hf", "model.from_config.n_embd=16", "model.from_config.n_layer=1", "data.seq_len=16",
             "data.min_samples=4", "sampler.clients_per_round=3", "eval_every=1"]
    first, _ = train.train(config.build(compose_cfg(*small, "model.lora.enabled=false", "rounds=2",
                                                    f"run_dir={tmp_path / 'first'}", tiny=False)))
    assert CliRunner().invoke(app, ["export", str(first), str(tmp_path / "ckpt")]).exit_code == 0
    second, _ = train.train(config.build(compose_cfg(*small, f"model.name_or_path={tmp_path / 'ckpt'}",
                                                     "model.from_config=null", "rounds=1",
                                                     f"run_dir={tmp_path / 'second'}", tiny=False)))
    end = pd.read_csv(first / "metrics.csv")["eval_loss"].iloc[-1]
    start = pd.read_csv(second / "metrics.csv")["eval_loss"].iloc[0]  # LoRA B = 0: the base exactly
    assert start == pytest.approx(end, abs=1e-5)


# ---- model.lora.aggregation=ffa (FFA-LoRA: A frozen, only B trains and travels) -----------------

FFA = dataclasses.replace(LORA, aggregation="ffa")


def test_ffa_trains_only_b_and_every_worker_draws_the_same_a(cfg=GPT2):
    model = build(cfg, FFA)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_B" in n for n in trainable)
    assert flatten_parameters(model).numel() == lora_size_closed_form(cfg, LORA.r) * 3 // 4  # B: (3 n_embd) x r
    torch.manual_seed(123)  # another caller RNG (another worker): the same frozen A
    other = build(cfg, FFA)
    for (_, a, _), (_, a2, _) in zip(lora_pairs(model), lora_pairs(other)):
        assert torch.equal(a, a2) and a.abs().sum() > 0  # peft's A is random, not zero


def test_ffa_aggregation_error_is_zero_and_avg_is_not():
    torch.manual_seed(0)
    ffa, avg = build(lora=FFA), build(lora=LORA)
    for model in (ffa, avg):
        flat = flatten_parameters(model)
        clients = [flat + 0.1 * torch.randn_like(flat) for _ in range(4)]
        error = lora_aggregation_error(clients, model, weights=[1.0, 2.0, 3.0, 4.0])
        if model is ffa:  # mean(B_i A) = mean(B_i) A: equal up to float64 rounding
            assert error < 1e-14
        else:
            assert error > 1e-3


def test_ffa_run_sends_only_b(compose_cfg, tmp_path):
    import pandas as pd

    from fedrun import config, train

    exp = config.build(compose_cfg("model=hf", "model.from_config.n_embd=16", "model.from_config.n_layer=1",
                                   "model.lora.r=2", "model.lora.aggregation=ffa", "rounds=2", "data.seq_len=16",
                                   "data.min_samples=4", "sampler.clients_per_round=3",
                                   f"run_dir={tmp_path / 'ffa'}", tiny=False))
    b_size = 1 * 3 * 16 * 2  # B of GPT-2's c_attn: (3 n_embd) x r, one layer
    assert sum(p.numel() for p in exp.make_model().parameters() if p.requires_grad) == b_size
    run_dir, _ = train.train(exp)
    m = pd.read_csv(run_dir / "metrics.csv").iloc[1:]
    assert (m["bytes_up"] == m["reported"] * b_size * 4).all()
    assert (m["lora_agg_error"] < 1e-14).all()


# ---- model.lora.aggregation=flexlora: the rank-r SVD of the clients' mean product ----------------

def test_flexlora_step_is_numpys_truncated_svd_of_the_mean_product():
    from fedrun.core import ClientUpdate
    from fedrun.lora.flexlora import FlexLoRA

    def make():
        return build(lora=dataclasses.replace(LORA, aggregation="flexlora"))

    method = FlexLoRA(make_model=make, device=torch.device("cpu"), seed=0)
    model = make()
    previous = flatten_parameters(model).detach().clone()
    g = torch.Generator().manual_seed(0)
    updates = [ClientUpdate(client_id=i, delta=0.1 * torch.randn(previous.shape, generator=g), num_examples=n,
                            train_loss=0.0, seconds=0.0, bytes_up=0) for i, n in enumerate([3, 5, 8])]
    stepped = method.server_step(previous, previous.clone(), updates)
    p = np.array([3, 5, 8], dtype=np.float64) / 16
    errors = []
    for (_, a, b), (a_at, _, b_at, _) in zip(lora_pairs(model), method.layers):
        full = sum(w * (previous + u.delta)[b_at:b_at + b.numel()].view(b.shape).double().numpy()
                   @ (previous + u.delta)[a_at:a_at + a.numel()].view(a.shape).double().numpy()
                   for w, u in zip(p, updates))
        u_, s, vh = np.linalg.svd(full, full_matrices=False)
        r = a.shape[0]
        best = (u_[:, :r] * s[:r]) @ vh[:r]  # Eckart-Young: the best rank-r approximation
        b_new = stepped[b_at:b_at + b.numel()].view(b.shape).double().numpy()
        a_new = stepped[a_at:a_at + a.numel()].view(a.shape).double().numpy()
        np.testing.assert_allclose(b_new @ a_new, best, rtol=1e-5, atol=1e-7)
        errors.append(np.linalg.norm(full - best) / np.linalg.norm(full))
    assert method.aggregation_error(previous, updates) == pytest.approx(np.mean(errors), rel=1e-4)
    assert 0 < np.mean(errors) < 1  # three rank-4 products: their mean has rank up to 12


def test_flexlora_run_and_refusals(compose_cfg, tmp_path):
    import pandas as pd

    from fedrun import config, train
    from fedrun.core import FedrunError

    tiny = ["model=hf", "model.from_config.n_embd=16", "model.from_config.n_layer=1", "model.lora.r=2",
            "model.lora.aggregation=flexlora", "data.seq_len=16", "data.min_samples=4"]
    exp = config.build(compose_cfg(*tiny, "rounds=2", "sampler.clients_per_round=3", f"run_dir={tmp_path / 'flex'}",
                                   tiny=False))
    run_dir, _ = train.train(exp)
    m = pd.read_csv(run_dir / "metrics.csv").iloc[1:]
    assert m["lora_agg_error"].between(0, 1).all() and m["eval_loss"].notna().iloc[-1]
    for extra, message in ((["strategy=fedadam"], "flexlora forms the server step itself"),
                           (["privacy=central_dp", "sampler.kind=poisson"], "flexlora multiplies each client's own")):
        with pytest.raises(FedrunError, match=message):
            compose_cfg(*tiny, *extra, tiny=False)


# ---- model.lora.aggregation=flora: the exact mean product merged into the base ---------------------

FLORA = dataclasses.replace(LORA, aggregation="flora")


def test_flora_merges_exactly_the_mean_product_into_the_base():
    from fedrun.core import ClientUpdate
    from fedrun.lora.flora import FLoRA

    method = FLoRA(make_model=lambda: build(lora=FLORA), device=torch.device("cpu"), seed=0)
    model = build(lora=FLORA)
    previous = flatten_parameters(model).detach().clone()
    adapters = torch.zeros_like(previous, dtype=torch.bool)
    for a_at, a_shape, b_at, b_shape in method.layers:
        adapters[a_at:a_at + a_shape.numel()] = True
        adapters[b_at:b_at + b_shape.numel()] = True
    g = torch.Generator().manual_seed(1)
    deltas = [torch.where(adapters, 0.05 * torch.randn(previous.shape, generator=g), 0) for _ in range(2)]
    updates = [ClientUpdate(client_id=i, delta=d, num_examples=n, train_loss=0.0, seconds=0.0, bytes_up=0)
               for i, (d, n) in enumerate(zip(deltas, [2, 6]))]
    stepped = method.server_step(previous, previous.clone(), updates)
    assert method.aggregation_error(previous, updates) < 1e-6
    flatten_parameters(model).copy_(stepped)
    # By hand: the plain base (same init_seed), each c_attn weight plus (alpha/r) sum_i p_i (B_i A_i)^T (Conv1D).
    plain = build(lora=NO_LORA)
    p = np.array([2, 6]) / 8
    with torch.no_grad():
        for block, (a_at, a_shape, b_at, b_shape) in zip(plain.model.transformer.h, method.layers):
            product = sum(w * (previous + u.delta)[b_at:b_at + b_shape.numel()].view(b_shape).double().numpy()
                          @ (previous + u.delta)[a_at:a_at + a_shape.numel()].view(a_shape).double().numpy()
                          for w, u in zip(p, updates))
            block.attn.c_attn.weight += torch.from_numpy(LORA.alpha / LORA.r * product.T).float()
    x = tokens()
    torch.testing.assert_close(model.eval()(x), plain.eval()(x), rtol=1e-4, atol=1e-5)  # adapters restarted: B = 0
    for a_at, a_shape, b_at, b_shape in method.layers:  # A back to the run's initial draw, B to 0
        torch.testing.assert_close(stepped[a_at:a_at + a_shape.numel()], method.initial[a_at:a_at + a_shape.numel()])
        assert not stepped[b_at:b_at + b_shape.numel()].any()


def test_flora_run_trains_adapters_only_and_exports_the_merged_model(compose_cfg, tmp_path):
    import pandas as pd
    from typer.testing import CliRunner

    from fedrun import config, train
    from fedrun.cli import app

    exp = config.build(compose_cfg("model=hf", "model.from_config.n_embd=16", "model.from_config.n_layer=1",
                                   "model.lora.r=2", "model.lora.aggregation=flora", "data.seq_len=16",
                                   "data.min_samples=4", "rounds=2", "sampler.clients_per_round=3",
                                   "client.optimizer=adam", f"run_dir={tmp_path / 'flora'}", tiny=False))
    adapters = 1 * 2 * (16 + 3 * 16)
    assert exp.lora.base_coords == 16 * 3 * 16
    from fedrun.client import LocalTrainer
    from fedrun.config import client_config
    from fedrun.core import ClientJob, RoundContext

    trainer = LocalTrainer(exp.make_model, client_config(exp.cfg), torch.device("cpu"))  # Adam, 2 local steps
    start = exp.server_model.initial_weights()
    delta = trainer.train(ClientJob(0), exp.data.clients[0], start, RoundContext(1, 0, exp.data.num_clients)).delta
    base, (_, _, b_at, b_shape) = exp.lora.bases[0], exp.lora.layers[0]
    assert not delta[base.at:base.at + base.shape.numel()].any()  # the base weights never train
    assert delta[b_at:b_at + b_shape.numel()].any()
    run_dir, _ = train.train(exp)
    m = pd.read_csv(run_dir / "metrics.csv").set_index("round")
    assert (m.loc[1:, "bytes_up"] == m.loc[1:, "reported"] * adapters * 4).all()  # the base never trains
    assert m.loc[1, "bytes_down"] == 0 and m.loc[2, "bytes_down"] == m.loc[2, "sampled"] * 3 * adapters * 4
    assert (m.loc[1:, "lora_agg_error"] < 1e-5).all()
    out = CliRunner().invoke(app, ["export", str(run_dir), str(tmp_path / "merged")])
    assert out.exit_code == 0, out.output
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)
    from fedrun import generate

    final = generate.load_model(run_dir, device="cpu")[0]  # the run's final global model
    x = tokens()[:, :16]
    torch.testing.assert_close(merged.eval()(input_ids=x).logits[..., :256], final.eval()(x), rtol=1e-4, atol=1e-5)


# ---- client.lora_ranks: heterogeneous ranks (flora, flexlora, hetlora) -----------------------------

def _mixed(aggregation: str):
    """A rank-4 model, and the method with clients of ranks 1, 2 and 4."""
    from fedrun.lora import round_method

    lora = dataclasses.replace(LORA, aggregation=aggregation)
    entries = [{"rank": 1, "fraction": 0.25}, {"rank": 2, "fraction": 0.25}, {"rank": 4, "fraction": 0.5}]
    method = round_method(aggregation, make_model=lambda: build(lora=lora), device=torch.device("cpu"), seed=0,
                          rank_entries=entries, num_clients=8)
    return lora, method


def test_a_lower_rank_client_starts_truncated_and_keeps_the_rest_at_zero():
    from fedrun.client import LocalTrainer
    from fedrun.client_config import ClientConfig
    from fedrun.core import ClientJob, RoundContext
    from fedrun.data.examples import ClientData, Windows

    lora, method = _mixed("flexlora")
    ranks = method.ranks
    assert sorted(ranks.rank_of) == [1, 1, 2, 2, 4, 4, 4, 4]  # by fraction, a seeded permutation
    client = ranks.rank_of.index(1)
    model = build(lora=lora)
    weights = flatten_parameters(model).detach().clone()
    job = method.client_job(ClientJob(client))
    start = job.start(weights)
    for (a_at, a_shape, b_at, b_shape) in method.layers:
        a = start[a_at:a_at + a_shape.numel()].view(a_shape)
        b = start[b_at:b_at + b_shape.numel()].view(b_shape)
        assert not a[1:].any() and not b[:, 1:].any() and a[0].equal(weights[a_at:a_at + a_shape[1]])
    assert job.coords_down == weights.numel() - len(ranks.beyond[1])
    data = ClientData("c", Windows(tokens(8, seed=3).to(torch.uint8)), Windows(tokens(2).to(torch.uint8)))
    cfg = ClientConfig(optimizer="adam", lr=0.01, momentum=0.0, weight_decay=0.0, batch_size=4, local_epochs=None,
                       local_steps=3)
    update = LocalTrainer(lambda: build(lora=lora), cfg, torch.device("cpu")).train(job, data, weights,
                                                                                   RoundContext(1, 0, 8))
    assert not update.delta[ranks.beyond[1]].any() and update.delta.any()  # rows and columns past rank 1 stay 0
    sent = method.on_client(update, RoundContext(1, 0, 8)).bytes_up
    assert sent == 4 * sum(1 * (a_shape[1] + b_shape[0]) for _, a_shape, _, b_shape in method.layers)


def test_hetlora_is_a_zero_padded_sparsity_weighted_average():
    from fedrun.core import ClientUpdate

    lora, method = _mixed("hetlora")
    model = build(lora=lora)
    previous = flatten_parameters(model).detach().clone()
    g = torch.Generator().manual_seed(2)
    clients = [method.ranks.rank_of.index(r) for r in (1, 2, 4)]
    updates = []
    for n, c in enumerate(clients):
        start = method.ranks.start(c, previous)
        local = start + 0.1 * torch.randn(previous.shape, generator=g)
        local = method.ranks.start(c, local)  # its coordinates past its rank stay 0
        updates.append(ClientUpdate(client_id=c, delta=local - start, num_examples=n + 1, train_loss=0.0,
                                    seconds=0.0, bytes_up=0))
    stepped = method.server_step(previous, previous.clone(), updates)
    for a_at, a_shape, b_at, b_shape in method.layers:
        a_i = [(method.ranks.start(u.client_id, previous) + u.delta)[a_at:a_at + a_shape.numel()]
               .view(a_shape).double().numpy() for u in updates]
        b_i = [(method.ranks.start(u.client_id, previous) + u.delta)[b_at:b_at + b_shape.numel()]
               .view(b_shape).double().numpy() for u in updates]
        norms = np.array([np.linalg.norm(b @ a) for a, b in zip(a_i, b_i)])
        p = norms / norms.sum()
        np.testing.assert_allclose(stepped[a_at:a_at + a_shape.numel()].view(a_shape).numpy(),
                                   sum(w * a for w, a in zip(p, a_i)), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(stepped[b_at:b_at + b_shape.numel()].view(b_shape).numpy(),
                                   sum(w * b for w, b in zip(p, b_i)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("aggregation", ["flora", "flexlora", "hetlora"])
def test_mixed_rank_runs(aggregation, compose_cfg, tmp_path):
    import pandas as pd

    from fedrun import config, train

    ranks = "client.lora_ranks=[{rank: 1, fraction: 0.5}, {rank: 2, fraction: 0.5}]"
    exp = config.build(compose_cfg("model=hf", "model.from_config.n_embd=16", "model.from_config.n_layer=1",
                                   "model.lora.r=2", f"model.lora.aggregation={aggregation}", ranks,
                                   "data.seq_len=16", "data.min_samples=4", "rounds=2", "sampler.clients_per_round=3",
                                   f"run_dir={tmp_path / aggregation}", tiny=False))
    run_dir, _ = train.train(exp)
    m = pd.read_csv(run_dir / "metrics.csv").set_index("round")
    clients = pd.read_csv(run_dir / "clients.csv")
    per_rank = 16 + 3 * 16  # in + out of c_attn, one layer
    expected = sum(exp.lora.ranks.rank(c) * per_rank * 4 for c in clients[clients["round"] == 1]["client_id"])
    assert m.loc[1, "bytes_up"] == expected  # each client sends its rank's coordinates only
    assert m["lora_agg_error"].iloc[1:].between(0, 1).all() and np.isfinite(m.loc[2, "eval_loss"])


@pytest.mark.parametrize("overrides, message", [
    (["client.lora_ranks=[{rank: 1, fraction: 1.0}]", "model.lora.r=1"],
     "client.lora_ranks: model.lora.aggregation=avg"),
    (["model.lora.aggregation=flexlora", "client.lora_ranks=[{rank: 2, fraction: 1.0}]", "model.lora.r=4"],
     "model.lora.r: the adapters are built at the largest rank of client.lora_ranks"),
    (["model.lora.aggregation=hetlora", "client.lora_ranks=[{rank: 2, fraction: 0.7}]", "model.lora.r=2"],
     "fractions sum to 0.7"),
])
def test_mixed_rank_refusals(compose_cfg, overrides, message):
    from fedrun.core import FedrunError

    with pytest.raises(FedrunError, match=message):
        compose_cfg("model=hf", *overrides, tiny=False)


def test_flora_is_never_batched_by_vmap_which_would_bypass_its_gradient_hook():
    from fedrun.backends.vectorized import unbatchable
    from fedrun.client import LocalTrainer
    from fedrun.client_config import ClientConfig

    no_dropout = {**GPT2, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    cfg = ClientConfig(optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, batch_size=4, local_epochs=None,
                       local_steps=1)
    assert unbatchable(LocalTrainer(lambda: build(no_dropout, LORA), cfg, torch.device("cpu"))) is None
    reason = unbatchable(LocalTrainer(lambda: build(no_dropout, FLORA), cfg, torch.device("cpu")))
    assert reason is not None and "hook" in reason
