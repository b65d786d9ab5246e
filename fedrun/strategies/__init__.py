"""Server strategies: one class in one module per `strategy=` option (fedavg.py: FedAvg, ...,
fed_distill.py: FedDistill), each an object with `client_job`, `aggregate`, `apply`,
`state_dict` and `load_state_dict` (fedrun.core.Strategy) and, where its clients do more than
train plainly, a `local_rule` (fedrun.core.LocalRule). The modules that are not options hold
what they share: server.py (the base), server_opt.py (FedOpt), aggregate.py and robust.py (the
aggregation rules), client_models.py and fed_distill_client.py (logit exchange's client side).
"""
