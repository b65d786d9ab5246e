"""fedrun: federated learning of language models with privacy protection."""
__version__ = "0.1.0"
