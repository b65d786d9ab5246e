"""Data sources and partitioners: text -> per-client tensors of token windows."""
from fedrun.data.text import ClientData, FederatedData

__all__ = ["ClientData", "FederatedData"]
