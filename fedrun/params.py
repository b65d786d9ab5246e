"""Model parameters as one flat vector.

Every trainable parameter of a model is rebound as a view into one contiguous float32
buffer, so loading the global weights into the worker's model is a single `copy_` and
the client's update is a single subtraction; no state_dict round trips, no deep copies.
"""
from __future__ import annotations

import torch
from torch import nn


def flatten_parameters(model: nn.Module) -> torch.Tensor:
    """Rebind the model's trainable parameters as views into one new buffer; return it.

    `model.parameters()` yields a tied tensor once, so it appears once in the vector.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        n = p.numel()
        p.data = flat[offset : offset + n].view_as(p)
        offset += n
    return flat
