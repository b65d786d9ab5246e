"""Data sources and partitioners: raw data -> per-client tensors of examples."""
from fedrun.data.examples import ClientData, Examples, FederatedData, Labelled, Windows

__all__ = ["ClientData", "Examples", "FederatedData", "Labelled", "Windows"]
