"""Tiny models: TinyNet has outputs a test can compute by hand; TinyCNN is where per-request overhead dominates."""
from __future__ import annotations

import time

import torch
from torch import nn


class TinyNet(nn.Module):
    """Mean of each input channel, then one linear layer: logits = fc(channel means)."""

    def __init__(self, num_classes: int = 3, in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.pool(x).flatten(1)))


class TinyCNN(nn.Module):
    """Two small conv layers and a classifier: a few MFLOPs per image."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class SlowNet(TinyNet):
    """TinyNet whose forward takes at least delay_ms: keeps requests in flight for fault and overload tests."""

    def __init__(self, num_classes: int = 3, in_channels: int = 3, delay_ms: float = 100.0):
        super().__init__(num_classes, in_channels)
        self.delay_s = delay_ms / 1000.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)
        return super().forward(x)
