"""The last finished round's state, held in memory so that Ctrl-C can checkpoint it.

Checkpoints are written every `checkpoint_every` rounds; a run stopped between two would resume
from the older one and train the rounds after it again. The state at a round's end is copied
while it is small (MAX_BYTES: a copy of milliseconds, a write of a fraction of a second), and an
interrupted run writes it as the checkpoint of its last finished round. It cannot be taken at
the interrupt itself: a round stopped half-way has already changed some states (error-feedback
residuals, SCAFFOLD's client controls, the privacy ledger).
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch

from fedrun.core import FedrunError
from fedrun.rundir import RunDir

log = logging.getLogger(__name__)

MAX_BYTES = 64 << 20


class LastRound:
    def __init__(self, *, max_bytes: int = MAX_BYTES):
        self.max_bytes = max_bytes
        self.round_idx: int | None = None
        self.state: dict | None = None
        self.small = True  # turned off for the run once a state is too large to copy each round

    def keep(self, round_idx: int, make_state: Callable[[], dict] | None) -> None:
        """Hold `make_state()` as round `round_idx`'s state; None: that round has its checkpoint on disk."""
        self.round_idx, self.state = round_idx, None
        if make_state is None or not self.small:
            return
        state = make_state()
        if _bytes(state) > self.max_bytes:
            log.info("the round state is over %d MiB: Ctrl-C will resume from the last periodic checkpoint",
                     self.max_bytes >> 20)
            self.small = False
            return
        self.state = copy.deepcopy(state)  # the next round changes its tensors and dicts in place

    def save(self, rundir: RunDir, *, keep: int | None) -> int | None:
        """Write the held state as a checkpoint; the round written, or None when there was none to write."""
        if self.state is None or self.round_idx is None:
            return None
        try:
            rundir.save_checkpoint(self.round_idx, self.state, keep=keep)
        except (FedrunError, KeyboardInterrupt) as e:  # a full disk, a second Ctrl-C: the older checkpoint stays
            log.error("checkpoint of round %d not written on interrupt: %s", self.round_idx, e or "interrupted")
            return None
        log.info("interrupted: checkpoint of round %d written", self.round_idx)
        return self.round_idx


def _bytes(node: Any) -> int:
    if isinstance(node, torch.Tensor):
        return node.numel() * node.element_size()
    if isinstance(node, dict):
        return sum(_bytes(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return sum(_bytes(v) for v in node)
    return 0
