"""The client-side hooks every backend runs on an update once local training has produced it.

Hooks (an attack, then privacy, then compression) are stateful objects of the main process:
error-feedback residuals, a local-DP accountant, secure aggregation's round state. Backends
that train elsewhere (worker processes, Ray actors) bring the updates back and run the hooks
here, in job order, exactly as if each client had run them before sending.
"""
from __future__ import annotations

from collections.abc import Sequence

from fedrun.core import ClientHook, ClientUpdate, RoundContext


def apply_client_hooks(update: ClientUpdate, hooks: Sequence[ClientHook], ctx: RoundContext) -> ClientUpdate:
    """`update` after each hook in order: what actually leaves the client."""
    for hook in hooks:
        update = hook.on_client(update, ctx)
    return update
