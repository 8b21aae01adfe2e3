"""EagerRuntime: the loaded nn.Module itself runs the forward, under torch.inference_mode()."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class EagerRuntime:
    """Runs a module in eager PyTorch on its device; inputs are a float batch or a list of float images."""

    name = "eager"

    def __init__(self, module: nn.Module, device: torch.device, half: bool = False, channels_last: bool = False):
        self.module = module
        self.device = device
        self.half = half and device.type == "cuda"
        self.channels_last = channels_last

    def _place(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        if self.half:
            x = x.half()
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, inputs: torch.Tensor | list[torch.Tensor]) -> Any:
        """The module's output for a float batch [N, C, H, W], or for a list of [C, H, W] images (detectors)."""
        with torch.inference_mode():
            if isinstance(inputs, torch.Tensor):
                return self.module(self._place(inputs))
            return self.module([self._place(x) for x in inputs])

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}
