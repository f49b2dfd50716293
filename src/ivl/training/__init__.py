"""Staged training: freeze plans, loss reweighting, the trainer and distributed helpers."""
