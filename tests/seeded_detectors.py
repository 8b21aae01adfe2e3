"""torchvision detectors with seeded weights that behave like trained ones where it matters for comparing
runtimes: spread scores. A freshly initialised detector's activations fade through the backbone, so it
scores every box alike (dozens exactly 0.2066) and which of the tied boxes a top-k keeps is arbitrary.
Here the backbone's batch norms take their statistics from real photos and the classifier's weights are
scaled up, so scores and boxes differ from one another as a trained model's do. Also the photos
(scikit-image's, at several sizes and aspect ratios). Used by the tests and bench/detectors.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from skimage import data
from torch import nn
from torchvision.models import detection

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")


def photo(name: str, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """A scikit-image photo as float [3, H, W] in 0-1, resized to height x width when given."""
    image = torch.from_numpy(getattr(data, name)()[..., :3].copy()).permute(2, 0, 1).float().div(255)
    if height is not None:
        image = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return image


def sized_photos(sizes=((300, 451), (480, 360), (256, 512))) -> list[torch.Tensor]:
    """One photo a size (height, width), taking turns through PHOTOS."""
    return [photo(PHOTOS[i % len(PHOTOS)], h, w) for i, (h, w) in enumerate(sizes)]


def seeded_detector(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """torchvision.models.detection.<name> with seeded weights, batch norms calibrated on the photos and its
    classifier scaled so scores spread; in eval mode. kwargs go to the builder (num_classes, min_size...)."""
    torch.manual_seed(seed)
    model = getattr(detection, name)(weights=None, weights_backbone=None, **kwargs)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model.eval()
    for norm in norms:  # running statistics averaged over the calibration batches
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    with torch.no_grad():
        images, _ = model.transform([photo(p) for p in PHOTOS])
        model.backbone(images.tensors)
    model.eval()
    with torch.no_grad():
        for module_name, module in model.named_modules():
            last = module_name.rsplit(".", 1)[-1]
            if last in ("cls_score", "cls_logits") and isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.mul_(20.0)
    return model
