"""Speed and memory of fedrun against a bare PyTorch floor, Flower and pfl-research (`make bench`)."""
