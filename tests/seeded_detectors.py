"""torchvision detectors with seeded weights that behave like trained ones where it matters for comparing
runtimes: spread scores. A freshly initialised detector's activations fade through the backbone, so it
scores every box alike (dozens exactly 0.2066) and which of the tied boxes a top-k keeps is arbitrary.
Here the backbone's batch norms take their statistics from real photos and the classifiers' weights are
scaled so their logits spread (LOGIT_STD on the photos): scores and boxes differ from one another as a
trained model's do. Also the photos (scikit-image's, at several sizes and aspect ratios). Used by the
tests and bench/detectors.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from skimage import data
from torch import nn
from torchvision.models import detection

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")
LOGIT_STD = 2.0  # scores spread over (0, 1) without saturating at exactly 1.0


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
    classifiers = [m for n, m in model.named_modules()
                   if n.rsplit(".", 1)[-1] in ("cls_score", "cls_logits") and isinstance(m, (nn.Linear, nn.Conv2d))]
    spreads: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in classifiers}

    def record(module, inputs, output):
        bias = module.bias.view(-1, *[1] * (output.dim() - 2)) if module.bias is not None else 0
        spreads[module].append((output - bias).flatten().std())

    hooks = [m.register_forward_hook(record) for m in classifiers]
    with torch.no_grad():
        model([photo(p) for p in PHOTOS[:2]])
        for module in classifiers:  # logits (less their bias) spread with a standard deviation of LOGIT_STD
            module.weight.mul_(LOGIT_STD / torch.stack(spreads[module]).mean())
    for hook in hooks:
        hook.remove()
    return model
