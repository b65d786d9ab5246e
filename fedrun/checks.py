"""Config checks that types cannot express: each key's allowed values (the markers of the
signature or record that declares it, fedrun/components.py) and the rules that tie keys and
components together, written over the capabilities components declare, never their names.

Each failure is one line naming the key, what is wrong and what is allowed.
"""
from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fedrun import threads
from fedrun.client_config import ClientConfig
from fedrun.components import capability, check_values, component, option_name
from fedrun.core import FedrunError
from fedrun.rundir import file_in_the_way
from fedrun.settings import COMPONENT_GROUPS, EvalSettings, RunSettings


def validate(cfg: DictConfig) -> None:
    """Every value against its key's markers, then the rules between keys and components."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise FedrunError(f"{missing[0]}: no value given; set it on the command line, e.g. {missing[0]}=...")
    check_values(cfg, RunSettings, "")
    check_values(cfg.client, ClientConfig, "client")
    check_values(cfg.eval, EvalSettings, "eval")
    for group in COMPONENT_GROUPS:
        check_component(cfg[group], group, group)
    _check_run_dir(cfg.run_dir)
    if "n_head" in cfg.model and cfg.model.n_embd % cfg.model.n_head:
        raise FedrunError(f"model.n_embd: {cfg.model.n_embd} is not a multiple of model.n_head={cfg.model.n_head}")
    _check_combinations(cfg)


def _check_run_dir(run_dir: str) -> None:
    """A run directory that is a file, or lies under one, fails before any data is read."""
    where = file_in_the_way(Path(run_dir).expanduser())
    if where is not None:
        raise FedrunError(f"run_dir: {run_dir}{where} is a file; allowed: a folder that does not exist yet or is empty")


def check_component(node: DictConfig, group: str, where: str) -> None:
    """A component's values against its signature's markers, and those of the nodes it builds."""
    target = component(node)
    check_values(node, target, where, group)
    for name, node_group in getattr(target, "config_nodes", {}).items():
        check_component(node[name], node_group, f"{where}.{name}")


def _named(cfg: DictConfig, group: str) -> str:
    return option_name(group, cfg[group]._target_)


def _check_combinations(cfg: DictConfig) -> None:
    """Rules that tie several keys or components together, over their declared capabilities."""
    threads.resolve(cfg.threads)  # auto, or an integer >= 1
    c = cfg.client
    if (c.local_steps_min is None) != (c.local_steps_max is None):
        raise FedrunError("client.local_steps_max: set both client.local_steps_min and client.local_steps_max, "
                          "or neither")
    if c.local_steps_min is not None and c.local_steps_min > c.local_steps_max:
        raise FedrunError(f"client.local_steps_min: {c.local_steps_min} is more than "
                          f"client.local_steps_max={c.local_steps_max}")
    if (cfg.client.local_epochs is None) == (cfg.client.local_steps is None):
        raise FedrunError("client.local_steps: set exactly one of client.local_epochs and client.local_steps "
                          f"(got local_epochs={cfg.client.local_epochs}, local_steps={cfg.client.local_steps})")
    if capability(cfg.strategy, "strategy", "needs_plain_sgd") and (c.optimizer != "sgd" or c.momentum):
        # Its YAML selects plain SGD (conf/base/plain_sgd.yaml): only an override can get here.
        raise FedrunError(f"client.optimizer: strategy={_named(cfg, 'strategy')} needs plain local SGD, which its "
                          f"client rule assumes (got {c.optimizer}, momentum {c.momentum}); allowed: "
                          "client.optimizer=sgd client.momentum=0")
    _check_no_exchange(cfg)
    _check_lora(cfg)
    _check_privacy(cfg)
    _check_distillation(cfg)
    _check_epsilon_audit(cfg)
    _check_eval(cfg)
    f = cfg.strategy.get("num_byzantine")
    if f is not None and cfg.sampler.clients_per_round < 2 * f + 3:
        raise FedrunError(f"sampler.clients_per_round: krum with strategy.num_byzantine={f} needs at least "
                          f"2 * {f} + 3 = {2 * f + 3} clients per round, got {cfg.sampler.clients_per_round}")


def uses_secure_sum(privacy: DictConfig) -> bool:
    """Whether the server sees only the sum of masked updates (a capability, or the key it names)."""
    secure = capability(privacy, "privacy", "secure_sum")
    return bool(privacy.get(secure)) if isinstance(secure, str) else bool(secure)


def _check_privacy(cfg: DictConfig) -> None:
    """Refuse combinations that would void the guarantee or that a mechanism cannot serve."""
    p, strategy = cfg.privacy, cfg.strategy
    secure = uses_secure_sum(p)
    if secure:
        _check_secure_aggregation(cfg)
    if capability(p, "privacy", "dp_level") != "user":
        weighting = capability(strategy, "strategy", "secure_sum_weighting")
        if secure and weighting is None and capability(strategy, "strategy", "exchanges") == "weights":
            raise FedrunError(f"strategy: {_named(cfg, 'strategy')} cannot be combined with privacy="
                              f"{_named(cfg, 'privacy')}: it needs the individual client updates, which secure "
                              "aggregation hides; use fedavg, fedavgm, fedprox, scaffold or an adaptive strategy")
        return
    if p.noise_multiplier is None and p.target_epsilon is None:
        raise FedrunError("privacy.noise_multiplier: null means calibrate it from privacy.target_epsilon, "
                          "which is not set; give one of them")
    dp = p.noise_multiplier is None or p.noise_multiplier > 0
    what = f"privacy={_named(cfg, 'privacy')}" if dp else "privacy.secure_agg"
    if dp and cfg.sampler.kind != "poisson":
        raise FedrunError(f"sampler.kind: {what} needs sampler.kind=poisson: its accountants assume each client "
                          f"is sampled independently with rate q; got {cfg.sampler.kind}")
    name = _named(cfg, "strategy")
    if capability(strategy, "strategy", "needs_individual_updates"):
        raise FedrunError(f"strategy: {name} cannot be combined with {what}: it needs the individual client "
                          "updates, which DP noise and secure aggregation hide; use fedavg, fedavgm or an adaptive "
                          "strategy")
    if capability(strategy, "strategy", "client_sends_extras"):
        raise FedrunError(f"strategy: {name} cannot be combined with {what}: what its clients send besides the "
                          "update (control variates) would be neither clipped nor noised")
    if p.stop_at_budget and p.target_epsilon is None:
        raise FedrunError("privacy.stop_at_budget: needs privacy.target_epsilon (the budget to stop at)")
    if p.target_epsilon is not None and p.noise_multiplier is not None and not p.stop_at_budget:
        raise FedrunError(f"privacy.target_epsilon: {p.target_epsilon} would be ignored with privacy.noise_multiplier="
                          f"{p.noise_multiplier}; set privacy.noise_multiplier=null to calibrate the noise to it, or "
                          "privacy.stop_at_budget=true to stop before exceeding it")


def _check_secure_aggregation(cfg: DictConfig) -> None:
    """Secure aggregation sums masked fixed-point vectors of at least secagg_min_clients clients."""
    p, k = cfg.privacy, cfg.sampler.clients_per_round
    if not capability(cfg.compression, "compression", "is_noop"):
        raise FedrunError("compression: secure aggregation sends masked fixed-point vectors, which cannot be "
                          "compressed afterwards; use compression=none (or privacy.secagg_bits to shrink them)")
    if cfg.sampler.kind != "poisson" and k < p.secagg_min_clients:
        raise FedrunError(f"privacy.secagg_min_clients: {p.secagg_min_clients} is more than the "
                          f"{k} clients of every round (sampler.clients_per_round), so every round would be skipped")
    largest = k + 6 * math.sqrt(k) if cfg.sampler.kind == "poisson" else k
    if p.secagg_bits is not None and largest * 2**p.secagg_bits > 2**32:
        raise FedrunError(f"privacy.secagg_bits: {p.secagg_bits} bits leave no room to sum a cohort of up to "
                          f"{int(largest)} clients modulo 2^32; allowed: at most "
                          f"{int(math.log2(2**32 / largest))}, or null (the most each round's cohort allows)")


def _check_distillation(cfg: DictConfig) -> None:
    """Logit exchange: clients keep their own models and send predictions on public text."""
    distill = capability(cfg.strategy, "strategy", "exchanges") == "logits"
    if cfg.client.models is not None and not distill:
        raise FedrunError("client.models: clients with different architectures need strategy=fed_distill "
                          "(weights of different models cannot be averaged); or set client.models=null")
    if not distill:
        return
    name = _named(cfg, "strategy")
    if capability(cfg.data, "data", "data_kind") != "text" or cfg.model.get("name_or_path"):
        raise FedrunError(f"strategy: {name} exchanges next-byte predictions on public text; it needs byte-level "
                          "text data and models (tiny_gpt or lstm), not labelled data or model=hf")
    why = {"attack": "attacks are defined on weight updates",
           "compression": "use strategy.topk_logits to shrink what clients send",
           "audit": f"the canary audit measures one global model, which {name} has not"}
    for group, reason in why.items():
        if not capability(cfg[group], group, "is_noop"):
            raise FedrunError(f"{group}: must be none with strategy={name}: {reason}")
    if uses_secure_sum(cfg.privacy) or capability(cfg.privacy, "privacy", "dp_level") == "example":
        raise FedrunError(f"privacy: strategy={name} supports privacy=none or central_dp (noise on the mean "
                          "of the clients' predictions)")
    _check_model_entries(cfg.client.models)


MIXED_RANKS = ("flora", "flexlora", "hetlora")  # the LoRA methods that combine factors of different ranks


def _check_lora(cfg: DictConfig) -> None:
    """model.lora.aggregation: a method other than avg needs adapters, and fedsa a strategy that averages them."""
    lora = cfg.model.get("lora")
    _check_lora_ranks(cfg.client.lora_ranks, lora)
    if lora is None or lora.aggregation == "avg":
        return
    if not lora.enabled:
        raise FedrunError(f"model.lora.aggregation: {lora.aggregation} combines LoRA factors; it needs "
                          "model.lora.enabled=true (or model.lora.aggregation=avg for full fine-tuning)")
    strategy = cfg.strategy
    if lora.aggregation == "fedsa" and (capability(strategy, "strategy", "exchanges") != "weights"
                                       or capability(strategy, "strategy", "trains_centrally")
                                       or capability(strategy, "strategy", "client_sends_extras")):
        raise FedrunError(f"model.lora.aggregation: fedsa keeps each client's B and averages A through the strategy; "
                          f"strategy={_named(cfg, 'strategy')} does not average plain updates (use fedavg, fedavgm, "
                          "fedprox, an adaptive or a robust strategy)")
    method = lora.aggregation
    if method in MIXED_RANKS:
        if not capability(strategy, "strategy", "averages_plainly"):
            raise FedrunError(f"model.lora.aggregation: {method} forms the server step itself (from the clients' "
                              f"products); it replaces strategy=fedavg's, not {_named(cfg, 'strategy')}'s")
        if uses_secure_sum(cfg.privacy) or capability(cfg.privacy, "privacy", "dp_level") == "user":
            raise FedrunError(f"privacy: model.lora.aggregation={method} multiplies each client's own factors, which "
                              f"privacy={_named(cfg, 'privacy')} hides from the server; allowed: privacy=none"
                              + ("" if method == "flora" else " or local_dp"))
    if method == "flora":
        if capability(cfg.privacy, "privacy", "dp_level") == "example":
            raise FedrunError("privacy: model.lora.aggregation=flora trains beside base weights that must stay "
                              "fixed, which DP-SGD's per-example steps would move; allowed: privacy=none")
        if cfg.client.weight_decay:
            raise FedrunError(f"client.weight_decay: {cfg.client.weight_decay} would move the base weights that "
                              "model.lora.aggregation=flora keeps fixed on the clients; allowed: 0")


def _check_lora_ranks(entries, lora) -> None:
    """client.lora_ranks: [{rank, fraction}, ...] for a LoRA method that combines mixed ranks."""
    if entries is None:
        return
    if lora is None or not lora.enabled or lora.aggregation not in MIXED_RANKS:
        method = "no LoRA" if lora is None or not lora.enabled else f"model.lora.aggregation={lora.aggregation}"
        raise FedrunError(f"client.lora_ranks: {method} cannot combine adapters of different ranks; allowed with "
                          f"model=hf and model.lora.aggregation one of {', '.join(MIXED_RANKS)}")
    if not entries:
        raise FedrunError("client.lora_ranks: an empty list; give at least one {rank, fraction}, or null")
    for i, entry in enumerate(entries):
        if not {"rank", "fraction"} <= set(entry) or set(entry) - {"rank", "fraction"}:
            raise FedrunError(f"client.lora_ranks[{i}]: each entry is {{rank: R, fraction: F}}; got {dict(entry)}")
        if not (isinstance(entry.rank, int) and 1 <= entry.rank <= lora.r):
            raise FedrunError(f"client.lora_ranks[{i}].rank: {entry.rank!r} is not allowed; allowed: an integer in "
                              f"1..{lora.r} (model.lora.r, the rank the adapters are built at)")
        if not 0 < entry.fraction <= 1:
            raise FedrunError(f"client.lora_ranks[{i}].fraction: {entry.fraction!r} is not allowed; allowed: a number "
                              "in (0, 1]")
    total = sum(e.fraction for e in entries)
    if abs(total - 1) > 1e-6:
        raise FedrunError(f"client.lora_ranks: the fractions sum to {total:g}; allowed: fractions that sum to 1")
    if max(e.rank for e in entries) != lora.r:
        raise FedrunError(f"model.lora.r: the adapters are built at the largest rank of client.lora_ranks "
                          f"({max(e.rank for e in entries)}); set model.lora.r={max(e.rank for e in entries)}")


def _check_no_exchange(cfg: DictConfig) -> None:
    """A baseline that sends nothing (local training alone, or one model on pooled data): what acts
    on what is sent has nothing to act on."""
    central = capability(cfg.strategy, "strategy", "trains_centrally")
    if capability(cfg.strategy, "strategy", "exchanges") != "nothing" and not central:
        return
    name = _named(cfg, "strategy")
    if central and (capability(cfg.privacy, "privacy", "dp_level") is not None or uses_secure_sum(cfg.privacy)):
        raise FedrunError(f"privacy: strategy={name} trains one model on the pooled data, with no client to "
                          "protect; allowed: privacy=none")
    if central and option_name("backend", cfg.backend._target_) != "sequential":
        raise FedrunError(f"backend: strategy={name} trains one model in the main process; allowed: "
                          "backend=sequential")
    if uses_secure_sum(cfg.privacy) or capability(cfg.privacy, "privacy", "dp_level") == "user":
        raise FedrunError(f"privacy: strategy={name} sends nothing to protect; allowed: privacy=none, or local_dp "
                          "(DP-SGD inside each client's training)")
    why = {"attack": "attacks tamper with updates sent to a server", "compression": "nothing is sent",
           "audit": "the canary audit plants secrets in clients' data" if central
           else f"the canary audit measures one global model, which {name} has not"}
    for group, reason in why.items():
        if not capability(cfg[group], group, "is_noop"):
            raise FedrunError(f"{group}: must be none with strategy={name}: {reason}")


def _check_epsilon_audit(cfg: DictConfig) -> None:
    """audit=epsilon's canary clients send a direction in the space of the global model's updates."""
    if not capability(cfg.audit, "audit", "inserts_clients"):
        return
    name, level = _named(cfg, "strategy"), capability(cfg.privacy, "privacy", "dp_level")
    if capability(cfg.strategy, "strategy", "client_sends_extras"):
        raise FedrunError(f"audit: epsilon's canary clients send an update and nothing else; strategy={name}'s "
                          "clients send more (control variates); use fedavg, fedavgm, fedprox or an adaptive strategy")
    if level == "example":
        raise FedrunError(f"audit: epsilon measures a user-level guarantee; privacy={_named(cfg, 'privacy')} "
                          "protects examples inside each client's training; allowed: privacy=central_dp, "
                          "secure_agg or none")
    lora = cfg.model.get("lora")
    if lora is not None and lora.enabled and lora.aggregation not in ("avg", "ffa"):
        raise FedrunError(f"model.lora.aggregation: audit=epsilon compares canary directions with the change of "
                          f"one global adapter; {lora.aggregation} does not average the adapters as sent; "
                          "allowed: avg, ffa")
    if level is None and not uses_secure_sum(cfg.privacy) and cfg.audit.canary_norm is None:
        raise FedrunError("audit.canary_norm: privacy=none has no clip norm to scale a canary's direction to; "
                          "set audit.canary_norm (e.g. a typical update norm, the clients.csv update_norm column)")


def _check_eval(cfg: DictConfig) -> None:
    """eval.samples and eval.choices read a global language model's answers."""
    if cfg.eval.clients is not None and not cfg.eval.per_client:
        raise FedrunError("eval.clients: samples the clients of eval.per_client, which is false; set "
                          "eval.per_client=true")
    key = "eval.samples" if cfg.eval.samples else "eval.choices" if cfg.eval.choices is not None else None
    if key is None:
        return
    if capability(cfg.data, "data", "data_kind") != "text":
        raise FedrunError(f"{key}: responses and multiple-choice answers need text data (a language model), "
                          f"not data={_named(cfg, 'data')}")
    if capability(cfg.strategy, "strategy", "exchanges") in ("logits", "nothing"):
        raise FedrunError(f"{key}: strategy={_named(cfg, 'strategy')} has no global model to answer with "
                          "(each client keeps its own); set eval.samples=0 and eval.choices=null")


def _check_model_entries(entries) -> None:
    if entries is None:
        return
    if not entries:
        raise FedrunError("client.models: an empty list; give at least one entry, or null for model=")
    for i, entry in enumerate(entries):
        for key in ("name", "option", "fraction"):
            if key not in entry:
                raise FedrunError(f"client.models[{i}].{key}: missing; each entry needs name, option (a model= option) "
                                  "and fraction, e.g. {name: small, option: tiny_gpt, fraction: 0.5, n_embd: 32}")
        if not 0 < entry.fraction <= 1:
            raise FedrunError(f"client.models[{i}].fraction: {entry.fraction!r} is not allowed; "
                              "allowed: a number in (0, 1]")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise FedrunError(f"client.models: names must differ (they name metrics); got {', '.join(map(str, names))}")
    total = sum(e.fraction for e in entries)
    if abs(total - 1) > 1e-6:
        raise FedrunError(f"client.models: the fractions sum to {total:g}; allowed: fractions that sum to 1")
