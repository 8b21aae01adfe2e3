"""Split detectors: torchvision's detection models with their dense parts (backbone + FPN + heads, the R-CNN
box, mask and keypoint heads) run by ONNX Runtime, and the data-dependent rest (transform, anchors, box
decoding, top-k, NMS, RoIAlign, postprocess) by the model's own eager code.

    family = detector_family(module)          # "rcnn", "retinanet", "fcos", "ssd" or None
    runtime = build_detector_runtime(module, sample, cache_key_parts={...}, cache_dir=path, verify=...)
    runtime.forward([image, ...])             # float [C, H, W] images in 0-1 -> the eager model's list of dicts

Why split: the whole model traced by the TorchScript exporter bakes in the export image's sizes and
branches (its anchors, its top-k counts), and the dynamo exporter fails on the data-dependent code; the
parts split off here are plain tensor programs with dynamic batch, height and width (or box count), which
the TorchScript exporter traces faithfully; the whole is still checked against eager at every start.
docs/runtimes.md (Detectors) has the measurements.
"""
from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from serve.errors import ExportError
from serve.extras import require
from serve.runtimes.onnx.build import Verify, build_onnx_runtime, check_against_eager
from serve.runtimes.onnx.isolate import run_in_child
from serve.runtimes.onnx.reasons import first_line
from serve.runtimes.onnx.session import OnnxRuntime

RESULT_KEYS = ("boxes", "labels", "scores", "masks", "keypoints", "keypoints_scores")


def detector_family(module: nn.Module) -> str | None:
    """Which split a torchvision detector takes: "rcnn" (Faster, Mask, Keypoint R-CNN), "retinanet",
    "fcos", "ssd" (SSD, SSDlite); None for any other module (exported whole, as before)."""
    if "torchvision.models.detection" not in sys.modules:
        return None  # no torchvision detector was built in this process: don't pay torchvision.models' import
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.ssd import SSD

    for family, cls in (("rcnn", GeneralizedRCNN), ("retinanet", RetinaNet), ("fcos", FCOS), ("ssd", SSD)):
        if isinstance(module, cls):
            return family
    return None


class DenseStage(nn.Module):
    """The backbone (+ FPN) and the dense head as one program: a padded batch [N, 3, H, W] -> the
    feature maps, then the head's outputs (RPN: objectness and box deltas per level; the one-stage
    heads: their dict's values in key order), as one flat tuple."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.backbone(x)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        levels = list(features.values())
        out = self.head(levels)
        heads = list(out.values()) if isinstance(out, Mapping) else [t for per_level in out for t in per_level]
        return (*levels, *heads)


class RoiStage(nn.Module):
    """An R-CNN head and its predictor as one program: pooled regions [K, C, h, w] -> the predictor's output."""

    def __init__(self, head: nn.Module, predictor: nn.Module):
        super().__init__()
        self.head, self.predictor = head, predictor

    def forward(self, x: torch.Tensor) -> Any:
        return self.predictor(self.head(x))


class SplitDetector:
    """A torchvision detector whose dense parts ONNX Runtime runs (`parts`: name -> OnnxRuntime) and whose
    data-dependent rest its own eager code runs; forward answers what the eager model does."""

    name = "onnxruntime"

    def __init__(self, module: nn.Module, family: str, parts: Mapping[str, OnnxRuntime], levels: Sequence[str],
                 head_keys: Sequence[str], info: Mapping[str, Any] | None = None):
        """levels: the backbone's feature names, in order; head_keys: a one-stage head's output keys
        (the R-CNN's RPN: none, its objectness and deltas come per level)."""
        self.module, self.family, self.parts = module, family, dict(parts)
        self.levels, self.head_keys = list(levels), list(head_keys)
        self.info = dict(info or {})

    @property
    def threads(self) -> int:
        return self.parts["dense"].threads

    @property
    def load_threads(self) -> int | None:
        return self.parts["dense"].load_threads

    def use_threads(self, threads: int | None) -> None:
        """Every part's sessions take `threads` (see OnnxRuntime.use_threads)."""
        for part in self.parts.values():
            part.use_threads(threads)

    def forward(self, batch: torch.Tensor | Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Float images [C, H, W] in 0-1 (a list, or a batch [N, C, H, W]) -> one dict an image, as the
        eager model answers.

        Raises:
            ExportError: ONNX Runtime can't open or run a part here.
        """
        images = list(batch)
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        model = self.module
        with torch.inference_mode():
            padded, _ = model.transform(images)
            outputs = self.parts["dense"].forward(padded.tensors)
            features = OrderedDict(zip(self.levels, outputs[: len(self.levels)]))
            heads = list(outputs[len(self.levels):])
            if self.family == "rcnn":
                detections = self._rcnn(padded, features, heads)
            else:
                detections = self._one_stage(padded, list(features.values()), dict(zip(self.head_keys, heads)))
            return model.transform.postprocess(detections, padded.image_sizes, original_sizes)

    def _rcnn(self, images, features: OrderedDict, heads: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """GeneralizedRCNN's eval forward after the backbone: RegionProposalNetwork then RoIHeads."""
        from torchvision.models.detection.roi_heads import keypointrcnn_inference, maskrcnn_inference
        from torchvision.models.detection.rpn import concat_box_prediction_layers

        rpn, roi = self.module.rpn, self.module.roi_heads
        levels = list(features.values())
        objectness, deltas = heads[: len(levels)], heads[len(levels):]
        anchors = rpn.anchor_generator(images, levels)
        per_level = [int(o[0].numel()) for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas, anchors).view(len(anchors), -1, 4)
        proposals, _ = rpn.filter_proposals(proposals, objectness, images.image_sizes, per_level)

        sizes = images.image_sizes
        class_logits, box_regression = self._roi("box", roi.box_roi_pool(features, proposals, sizes))
        boxes, scores, labels = roi.postprocess_detections(class_logits, box_regression, proposals, sizes)
        result = [{"boxes": b, "labels": l, "scores": s} for b, l, s in zip(boxes, labels, scores)]
        if roi.has_mask():
            mask_logits = self._roi("mask", roi.mask_roi_pool(features, [r["boxes"] for r in result], sizes))
            for probs, r in zip(maskrcnn_inference(mask_logits, [r["labels"] for r in result]), result):
                r["masks"] = probs
        if roi.keypoint_roi_pool is not None and roi.keypoint_head is not None and roi.keypoint_predictor is not None:
            kept = [r["boxes"] for r in result]
            logits = self._roi("keypoint", roi.keypoint_roi_pool(features, kept, sizes))
            points, point_scores = keypointrcnn_inference(logits, kept)
            for p, s, r in zip(points, point_scores, result):
                r["keypoints"], r["keypoints_scores"] = p, s
        return result

    def _roi(self, part: str, pooled: torch.Tensor) -> Any:
        """A RoI head on ONNX Runtime; no regions at all (nothing proposed) run eagerly, an empty program."""
        if len(pooled) == 0:
            roi = self.module.roi_heads
            head, predictor = {"box": (roi.box_head, roi.box_predictor), "mask": (roi.mask_head, roi.mask_predictor),
                               "keypoint": (roi.keypoint_head, roi.keypoint_predictor)}[part]
            return predictor(head(pooled))
        return self.parts[part].forward(pooled)

    def _one_stage(self, images, levels: list[torch.Tensor], heads: dict[str, torch.Tensor]) -> list[dict]:
        """RetinaNet's, FCOS's and SSD's eval forward after the head: anchors, split per level, postprocess."""
        model = self.module
        anchors = model.anchor_generator(images, levels)
        if self.family == "ssd":
            return model.postprocess_detections(heads, anchors, images.image_sizes)
        per_level = [x.size(2) * x.size(3) for x in levels]
        if self.family == "retinanet":  # A anchors a location
            per_level = [hw * (heads["cls_logits"].size(1) // sum(per_level)) for hw in per_level]
        split_heads = {k: list(v.split(per_level, dim=1)) for k, v in heads.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        return model.postprocess_detections(split_heads, split_anchors, images.image_sizes)

    def forward_isolated(self, *batches: torch.Tensor | Sequence[torch.Tensor]) -> list[list[dict[str, torch.Tensor]]]:
        """forward for each batch, run whole in one forked child when this process has not imported
        onnxruntime (the fork rule: it may fork workers later); in this process otherwise.

        Raises:
            ExportError: a part fails to open or run, or the child doesn't answer.
        """
        if "onnxruntime" in sys.modules or not hasattr(os, "fork"):
            return [self.forward(batch) for batch in batches]

        def work() -> list[list[np.ndarray]]:
            torch.set_num_threads(1)  # the parent's OpenMP team didn't survive the fork
            runs = []  # per image: which RESULT_KEYS it has, then those arrays
            for batch in batches:
                for found in self.forward(batch):
                    runs.append([np.array([k in found for k in RESULT_KEYS]),
                                 *(found[k].numpy() for k in RESULT_KEYS if k in found)])
            return runs

        runs = iter(run_in_child(work))
        answers = []
        for batch in batches:
            images = []
            for _ in range(len(batch)):
                has, *arrays = next(runs)
                keys = [k for k, present in zip(RESULT_KEYS, has) if present]
                images.append({k: torch.from_numpy(a) for k, a in zip(keys, arrays)})
            answers.append(images)
        return answers

    def describe(self) -> dict:
        parts = {name: part.describe() for name, part in self.parts.items()}
        dense = parts["dense"]
        caches = sorted({p["cache"] for p in parts.values()})
        return {
            "runtime": self.name,
            "split": f"{self.family}: {', '.join(self.parts)} on ONNX Runtime; transform, anchors, box decoding, "
                     "NMS, RoIAlign and postprocess eager",
            "export_s": self.info.get("export_s"),
            "verify_s": self.info.get("verify_s"),
            "exporter": dense.get("exporter"),
            "cache": caches[0] if len(caches) == 1 else ", ".join(f"{n} {p['cache']}" for n, p in parts.items()),
            "cache_note": "; ".join(f"{n}: {p['cache_note']}" for n, p in parts.items() if p.get("cache_note")) or None,
            "providers": dense["providers"],
            "threads": dense["threads"],
            "load_threads": dense["load_threads"],
            "sessions": dense["sessions"],
        }


def build_detector_runtime(module: nn.Module, sample: torch.Tensor, *, cache_key_parts: Mapping[str, Any],
                           cache_dir: Path | None, verify: Verify | None, dynamic_hw: bool = True,
                           device: torch.device | str = "cpu",
                           threads: int | None = None, load_threads: int | None = None,
                           score_threshold: float = 0.5) -> SplitDetector:
    """A torchvision detector (one detector_family names) as a SplitDetector: its parts exported (or taken
    from the cache, keyed by cache_key_parts plus the part) and the whole checked against eager with
    `verify` on detector_inputs, ONNX Runtime's side in a forked child. dynamic_hw: the
    backbone's input height and width are dynamic (a detector's transform keeps each image's aspect).
    The other arguments are build_onnx_runtime's.

    Raises:
        ExportError: a part's export, the check or the device failed; the message is the reason.
    """
    family = detector_family(module)
    if family is None:
        raise ExportError(f"{type(module).__name__} is not a torchvision detector that splits")
    for package in ("onnx", "onnxruntime"):
        require(package, "ONNX Runtime", ExportError)
    if torch.device(device).type != "cpu":
        raise ExportError(f"split detectors run on ONNX Runtime's CPU provider only, not {device}")
    module.eval()
    stages, samples, levels, head_keys = _stages(module, family, list(sample))
    parts = {}
    for name, stage in stages.items():
        parts[name] = build_onnx_runtime(
            stage, samples[name], cache_key_parts={**cache_key_parts, "split": family, "part": name},
            cache_dir=cache_dir, verify=None, dynamic_hw=dynamic_hw and name == "dense", device=device, threads=threads,
            load_threads=load_threads)
    exported = [p.info.get("export_s") for p in parts.values()]
    runtime = SplitDetector(module, family, parts, levels, head_keys, info={
        "export_s": round(sum(e for e in exported if e), 3) if any(exported) else None})
    if verify is not None:
        started = time.perf_counter()
        reason = check_against_eager(runtime, module, sample, verify, score_threshold=score_threshold,
                                     batches=detector_inputs(sample))
        runtime.info["verify_s"] = round(time.perf_counter() - started, 3)
        if reason is not None:
            raise ExportError(f"ONNX output differs from eager ({verify.__name__} rule, split {family}): {reason}")
    return runtime


def detector_inputs(sample: torch.Tensor) -> list[list[torch.Tensor]]:
    """The check's inputs: seeded random images in a detector's input range 0-1 and smooth as photos are
    (random colours at 1/16 of the size, upsampled, plus a little noise): one of the sample's size alone,
    then one taller and one wider together.

    Not the blank sample itself, nor normal noise (the other tasks' random input): a uniform image makes
    every interior location score alike, and noise outside 0-1 drives the scores to saturate at exactly
    1.0; either way which of the tied boxes a top-k keeps is arbitrary on any two runtimes."""
    generator = torch.Generator().manual_seed(0)
    _, c, h, w = sample.shape
    images = []
    for height, width in ((h, w), (h + 64, max(64, w - 32)), (max(64, h - 48), w + 96)):
        coarse = torch.rand((1, c, max(2, height // 16), max(2, width // 16)), generator=generator)
        image = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
        image += 0.05 * torch.randn((c, height, width), generator=generator)
        images.append(image.clamp_(0, 1).to(sample.device))
    return [images[:1], images[1:]]


def _stages(module: nn.Module, family: str, images: list[torch.Tensor]):
    """The stages to export, a sample input for each (from the model's own transform and pooling on the
    images), the backbone's feature names and a one-stage head's output keys.

    Raises:
        ExportError: the model fails on the images.
    """
    try:
        with torch.inference_mode():
            padded, _ = module.transform(images)
            features = module.backbone(padded.tensors)
            if isinstance(features, torch.Tensor):
                features = OrderedDict([("0", features)])
            levels = list(features)
            stages: dict[str, nn.Module] = {}
            samples = {"dense": padded.tensors}
            head_keys: list[str] = []
            if family == "rcnn":
                stages["dense"] = DenseStage(module.backbone, module.rpn.head)
                roi = module.roi_heads
                box = [torch.tensor([[0.0, 0.0, 32.0, 32.0], [8.0, 4.0, 60.0, 50.0]])] * len(images)
                heads = {"box": (roi.box_roi_pool, roi.box_head, roi.box_predictor)}
                if roi.has_mask():
                    heads["mask"] = (roi.mask_roi_pool, roi.mask_head, roi.mask_predictor)
                if roi.keypoint_roi_pool is not None and roi.keypoint_head is not None:
                    heads["keypoint"] = (roi.keypoint_roi_pool, roi.keypoint_head, roi.keypoint_predictor)
                for name, (pool, head, predictor) in heads.items():
                    stages[name] = RoiStage(head, predictor)
                    samples[name] = pool(features, box, padded.image_sizes)
            else:
                stages["dense"] = DenseStage(module.backbone, module.head)
                head_keys = list(module.head(list(features.values())))
    except Exception as exc:  # the user's model: any failure is a reason to stay eager
        raise ExportError(f"the detector fails on a sample: {first_line(exc)}") from None
    return stages, {k: v.clone() for k, v in samples.items()}, levels, head_keys
