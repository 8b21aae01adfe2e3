"""Ballast: a model of a chosen size whose answer is known: every image scores class `favourite` highest."""
from __future__ import annotations

import time

import torch
from torch import nn


class Ballast(nn.Module):
    """`megabytes` of float32 weights that the forward touches, and logits that put `favourite` first:
    logits[favourite] = 1, the others 0 (the weights' contribution is multiplied by zero).
    `load_delay_s` makes building it slow, as a big checkpoint's load is."""

    def __init__(self, num_classes: int = 3, megabytes: float = 16.0, favourite: int = 0, load_delay_s: float = 0.0):
        super().__init__()
        if load_delay_s:
            time.sleep(load_delay_s)
        self.weights = nn.Parameter(torch.zeros(int(megabytes * 2**20 / 4)))
        self.register_buffer("favourite", torch.nn.functional.one_hot(torch.tensor(favourite), num_classes).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        touched = self.weights[:: max(1, self.weights.numel() // 1024)].sum() * 0  # reads the weights
        return self.favourite.expand(x.shape[0], -1) + x.mean() * 0 + touched
