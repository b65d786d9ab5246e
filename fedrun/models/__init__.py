"""Models: every model maps (B, T) token ids to (B, T, vocab) logits."""
