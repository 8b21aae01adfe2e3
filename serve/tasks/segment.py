"""segment: torchvision's segmentation convention ({"out": [N, C, h, w]} or a plain tensor, at any
resolution) -> the class of every pixel of the uploaded image, as an 8-bit PNG, and each class's share.

The model sees the whole image (resized so its shorter side is preprocess.resize, the longer side at
most max_side; or, with crop_mode squash, both sides to resize; normalised; never cropped). Its class
map (the argmax over C; with one channel, the logit above 0) is scaled back to the uploaded image's size with nearest-neighbour sampling."""
from __future__ import annotations

import base64
import io
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from serve.errors import ConfigError
from serve.preprocess import RESAMPLE, draft_side
from serve.tasks.base import Options, Prepared, Result, Task, V2Output, judged_tensors, padded_tensor

PAD_UINT8 = 255  # V2 masks of several sizes are padded with this (not a class when classes <= 255)
SEGMENT_MIN_AGREEMENT = 0.999


class SegmentOptions(Options):
    max_side: int = Field(1024, gt=0, description="the longer side the model sees, at most (the shorter one is preprocess.resize)")
    max_aspect: float = Field(4.0, ge=1, description="a longer strip is padded with black (below or right) to this ratio of its sides")


class MaskImage(Result):
    format: Literal["png"] = "png"
    width: int
    height: int
    data: str = Field(description="base64 PNG of class indices (8-bit grey; 16-bit above 256 classes)")


class ClassShare(Result):
    label: str
    index: int = Field(ge=0)
    fraction: float = Field(ge=0, le=1, description="share of the image's pixels")


class Segmentation(Result):
    model: str
    mask: MaskImage
    classes: list[ClassShare] = Field(description="the classes present, largest share first")


class SegmentOutput:
    """One image's class map [h, w] and the winning class's probability per pixel, at model resolution."""

    __slots__ = ("classes", "confidence")

    def __init__(self, classes: torch.Tensor, confidence: torch.Tensor):
        self.classes = classes
        self.confidence = confidence


def class_map(eager: Any, runtime: Any, score_threshold: float = 0.5) -> str | None:
    """Segment's verification rule: at least SEGMENT_MIN_AGREEMENT of each image's pixels have the same
    argmax class (outputs [batch, classes, height, width]). None when they agree, else the reason."""
    e, o, reason = judged_tensors(eager, runtime)
    if reason is not None:
        return reason
    if e.ndim != 4:
        return f"output {list(e.shape)} is not [batch, classes, height, width]"
    same = (e.argmax(1) == o.argmax(1)).flatten(1).float().mean(1)
    if same.min() < SEGMENT_MIN_AGREEMENT:
        return (f"image {int(same.argmin())}: {100 * float(same.min()):.2f} % of pixels have the same argmax "
                f"class (at least {100 * SEGMENT_MIN_AGREEMENT:g} % needed)")
    return None


def pixel_classes(fp32: Sequence[SegmentOutput], int8: Sequence[SegmentOutput], gate: Any) -> tuple[dict, str | None]:
    """Segment's int8 gate: the share of all held-out pixels whose int8 class is fp32's (>= gate.pixel_agreement)."""
    same = sum(int((e.classes == o.classes).sum()) for e, o in zip(fp32, int8))
    total = sum(e.classes.numel() for e in fp32)
    worst = min(float((e.classes == o.classes).float().mean()) for e, o in zip(fp32, int8))
    agree = same / max(1, total)
    figures = {"images": len(fp32), "pixel_agreement": round(agree, 5), "worst_image_agreement": round(worst, 5)}
    if agree < gate.pixel_agreement:
        return figures, (f"int8 gives fp32's class to {agree:.2%} of held-out pixels "
                         f"(< pixel_agreement {gate.pixel_agreement:.2%})")
    return figures, None


class Segment(Task):
    name = "segment"
    verify_runtime = staticmethod(class_map)
    int8_gate = staticmethod(pixel_classes)
    torchserve_handler = "image_segmenter"
    Options = SegmentOptions
    Result = Segmentation
    fixed_size = False
    formats = ("json", "torchserve", "png")

    def __init__(self, spec, labels, device):
        super().__init__(spec, labels, device)
        self.num_classes: int | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.spec.preprocess.channels, -1, -1)

    def blank(self) -> torch.Tensor:
        side = self.spec.preprocess.resize
        return torch.zeros((self.spec.preprocess.channels, side, side), dtype=torch.uint8)

    def check(self, output: Any) -> None:
        logits = self._logits(output, 1)
        self.num_classes = max(2, logits.shape[1])
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ConfigError(f"model '{self.spec.name}': field 'labels': {len(self.labels)} labels, "
                              f"but the model segments {self.num_classes} classes")

    def summary(self) -> str:
        return f"segment, {self.num_classes} classes"

    def decode_sides(self) -> dict[str, int | None]:
        return {"min_side": draft_side(self.spec.preprocess), "max_side": None}

    def prepare(self, image: Image.Image, size: tuple[int, int]) -> Prepared:
        pre = self.spec.preprocess
        width, height = image.size
        if pre.crop_mode == "squash":  # both sides to resize, as a Hugging Face SegFormer processor does
            target = (pre.resize, pre.resize)
        else:
            scale = min(pre.resize / min(width, height), self.options.max_side / max(width, height))
            target = (max(1, round(width * scale)), max(1, round(height * scale)))
        if target != image.size:
            image = image.resize(target, RESAMPLE[pre.interpolation],
                                 reducing_gap=None if pre.exact else 3.0)
        tensor, content = padded_tensor(image, self.options.max_aspect)
        return Prepared(tensor, size, (image.width / size[0], image.height / size[1]), content)

    def run(self, forward, inputs: list[torch.Tensor]) -> list[SegmentOutput]:
        """Images of one shape run as one batch; other shapes in their own forward, answers in order."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, x in enumerate(inputs):
            groups[tuple(x.shape)].append(i)
        results: list[Any] = [None] * len(inputs)
        for indices in groups.values():
            outputs = super().run(forward, [inputs[i] for i in indices])
            for i, out in zip(indices, outputs):
                results[i] = out
        return results

    def _logits(self, output: Any, count: int) -> torch.Tensor:
        if isinstance(output, Mapping) and isinstance(output.get("out"), torch.Tensor):
            output = output["out"]
        if not isinstance(output, torch.Tensor) or output.ndim != 4 or output.shape[0] != count:
            raise self.unfit(output, f"a score map [{count}, classes, h, w] (or a dict with 'out')")
        return output

    def split(self, output: Any, count: int) -> list[SegmentOutput]:
        logits = self._logits(output, count).float()
        if logits.shape[1] == 1:
            p = logits[:, 0].sigmoid()
            classes, confidence = (p > 0.5).to(torch.uint8), torch.maximum(p, 1 - p)
        else:
            confidence, classes = logits.softmax(1).max(1)
        dtype = torch.uint8 if max(2, logits.shape[1]) <= 256 else torch.int32
        return [SegmentOutput(c.to(dtype).cpu(), p.cpu()) for c, p in zip(classes, confidence)]

    def class_map(self, output: SegmentOutput, prepared: Prepared) -> np.ndarray:
        """The class of every pixel of the uploaded image, [height, width]."""
        width, height = prepared.size
        classes = output.classes.numpy()
        if prepared.content is not None:
            classes = classes[: prepared.content[1], : prepared.content[0]]
        if classes.shape == (height, width):
            return classes
        mode = "L" if classes.dtype == np.uint8 else "I"
        resized = Image.fromarray(classes if mode == "L" else classes.astype(np.int32), mode).resize(
            (width, height), Image.Resampling.NEAREST)
        return np.asarray(resized, dtype=classes.dtype)

    def png(self, output: SegmentOutput, prepared: Prepared) -> bytes:
        """The class map of the uploaded image as a PNG (?format=png)."""
        return encode_png(self.class_map(output, prepared))

    def finish(self, output: SegmentOutput, prepared: Prepared, params: dict[str, Any]) -> Segmentation:
        classes = self.class_map(output, prepared)
        counts = np.bincount(classes.ravel(), minlength=self.num_classes or 0)
        total = classes.size
        present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i]]
        width, height = prepared.size
        return Segmentation(
            model=self.spec.name,
            mask=MaskImage(width=width, height=height, data=base64.b64encode(encode_png(classes)).decode("ascii")),
            classes=[ClassShare(label=self.label(i), index=i, fraction=round(counts[i] / total, 6)) for i in present],
        )

    def torchserve(self, outputs: Sequence[SegmentOutput], prepared, params) -> Any:
        """image_segmenter's answer: per image, [class, probability] for every pixel the model saw, [h][w][2]."""
        answers = [torch.stack([o.classes.float(), o.confidence], dim=-1).tolist() for o in outputs]
        return answers if len(answers) > 1 else answers[0]

    def v2_outputs(self) -> list[dict]:
        return [{"name": "mask", "datatype": self._v2_datatype(), "shape": [-1, -1, -1]}]

    def _v2_datatype(self) -> str:
        return "UINT8" if (self.num_classes or 0) <= PAD_UINT8 else "INT64"

    def v2_tensors(self, outputs, prepared, params, classification) -> list[V2Output]:
        """mask [N, H, W]: each image's class map at its uploaded size; smaller ones padded (255, or -1 as INT64)."""
        maps = [self.class_map(o, p) for o, p in zip(outputs, prepared)]
        height, width = max(m.shape[0] for m in maps), max(m.shape[1] for m in maps)
        datatype = self._v2_datatype()
        mask = np.full((len(maps), height, width), PAD_UINT8 if datatype == "UINT8" else -1,
                       np.uint8 if datatype == "UINT8" else np.int64)
        for i, m in enumerate(maps):
            mask[i, : m.shape[0], : m.shape[1]] = m
        return [V2Output("mask", datatype, mask, mask.shape)]

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "num_classes": self.num_classes}


def encode_png(classes: np.ndarray) -> bytes:
    """A class map as a PNG: 8-bit grey, or 16-bit grey for more than 256 classes."""
    image = Image.fromarray(classes if classes.dtype == np.uint8 else classes.astype(np.uint16))
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=6)
    return buf.getvalue()
