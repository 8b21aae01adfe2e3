"""Small real models whose right answers are known: they find the bright pixels of an image.

BrightBoxDetector follows torchvision's detection convention (a list of float [C, H, W] images in 0-1
in, one dict per image out): one detection of class 1 boxing the pixels brighter than `threshold`,
with that region's mask and its top-left and bottom-right corners as keypoints. BrightSegmenter follows
torchvision's segmentation convention ({"out": [N, 2, H, W]}): class 1 where a pixel is bright.
"""
from __future__ import annotations

import torch
from torch import nn


class BrightBoxDetector(nn.Module):
    def __init__(self, threshold: float = 0.5, score: float = 0.9):
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(threshold))
        self.score = nn.Parameter(torch.tensor(score))

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        answers = []
        for image in images:
            bright = image.mean(0) > self.threshold
            ys, xs = bright.nonzero(as_tuple=True)
            if len(xs) == 0:
                answers.append({"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64),
                                "scores": torch.zeros(0), "masks": torch.zeros((0, 1, *bright.shape)),
                                "keypoints": torch.zeros((0, 2, 3))})
                continue
            x1, y1, x2, y2 = xs.min().float(), ys.min().float(), xs.max().float() + 1, ys.max().float() + 1
            answers.append({
                "boxes": torch.stack([x1, y1, x2, y2])[None],
                "labels": torch.ones(1, dtype=torch.int64),
                "scores": self.score.detach()[None],
                "masks": bright.float()[None, None],
                "keypoints": torch.tensor([[[x1, y1, 1.0], [x2, y2, 1.0]]]),
            })
        return answers


class BrightSegmenter(nn.Module):
    def __init__(self, threshold: float = 0.5):
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(threshold))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        brightness = x.mean(1, keepdim=True) - self.threshold  # [N, 1, H, W]
        return {"out": torch.cat([torch.zeros_like(brightness), brightness], dim=1) * 10}
