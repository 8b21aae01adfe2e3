"""The seed article's example network: an AlexNet-style fully convolutional net with grouped convolutions."""
from __future__ import annotations

from torch import nn


class MyModel(nn.Module):
    """Outputs a [N, 32, h, w] score map; the server averages it spatially into 32 class scores."""

    def __init__(self, num_classes: int = 32):
        super().__init__()
        self.fully_conv = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=(11, 11), stride=(2, 2), bias=True),
            nn.BatchNorm2d(96),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2),
            nn.Conv2d(96, 256, kernel_size=(5, 5), stride=(1, 1), groups=2, bias=True),
            nn.BatchNorm2d(256),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=1),
            nn.Conv2d(256, 384, kernel_size=(3, 3), stride=(1, 1), groups=1, bias=True),
            nn.BatchNorm2d(384),
            nn.ReLU(),
            nn.Conv2d(384, 384, kernel_size=(3, 3), stride=(1, 1), groups=2, bias=True),
            nn.BatchNorm2d(384),
            nn.ReLU(),
            nn.Conv2d(384, num_classes, kernel_size=(3, 3), stride=(1, 1), groups=2, bias=True),
        )

    def forward(self, x):
        return self.fully_conv(x)
