"""Saved artifacts: `save` (save and load), `parity` (outputs recorded at save time) and `card` (the model card)."""
