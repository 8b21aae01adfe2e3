"""detect: torchvision's detection convention. The model takes a list of float [C, H, W] images in 0-1
of any size (its own transform resizes) and returns one dict per image: boxes (x1, y1, x2, y2 in input
pixels), labels, scores, and optionally masks [K, 1, H, W] (soft) and keypoints [K, P, 3]. Answers are
in pixels of the uploaded image as the user sees it (after EXIF rotation), best score first."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from serve.errors import CheckpointError
from serve.extras import require
from serve.tasks.base import Options, Prepared, Result, Task, V2Output, describe_type, padded_tensor, parse_number

RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
SCORE_TOL = 1e-4
BOX_TOL_PX = 0.01


class DetectOptions(Options):
    score_threshold: float = Field(0.5, ge=0, le=1, description="detections below this score are left out (?threshold= per request)")
    max_detections: int = Field(100, gt=0, description="most detections answered per image, best first")
    max_side: int = Field(1333, gt=0, description="a larger upload is scaled down to this longer side before the model "
                                                  "(boxes are mapped back); torchvision's R-CNNs resize to at most 1333 anyway")
    mask_threshold: float = Field(0.5, gt=0, lt=1, description="soft instance masks are cut here into the answered binary masks")
    max_aspect: float = Field(4.0, ge=1, description="a longer strip is padded with black (below or right) to this ratio of its sides")


class RleMask(Result):
    size: list[int] = Field(description="[height, width] of the uploaded image")
    counts: str = Field(description="COCO run-length encoding (pycocotools), column-major")


class Detection(Result):
    label: str
    index: int = Field(description="the class index as the model numbers it (torchvision's COCO list keeps __background__ at 0)")
    score: float
    box: list[float] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in pixels of the uploaded image")
    mask: RleMask | None = None
    keypoints: list[list[float]] | None = Field(None, description="[x, y, score] per keypoint")


class Detections(Result):
    model: str
    detections: list[Detection]


def detections(eager: Any, runtime: Any, score_threshold: float = 0.5) -> str | None:
    """Detect's verification rule: per image, the same number of detections scored >= score_threshold,
    each eager one matched by one of the runtime's with the same label, score within SCORE_TOL and box
    corners within BOX_TOL_PX pixels. None when they agree, else the reason."""
    if not isinstance(eager, list) or not isinstance(runtime, list) or len(eager) != len(runtime):
        return f"expected one detection dict an image, got {describe_type(eager)} and {describe_type(runtime)}"
    for i, (e, o) in enumerate(zip(eager, runtime)):
        if not all(k in d for d in (e, o) for k in ("boxes", "labels", "scores")):
            return f"image {i}: detections need boxes, labels and scores"
        keep_e, keep_o = e["scores"] >= score_threshold, o["scores"] >= score_threshold
        if int(keep_e.sum()) != int(keep_o.sum()):
            return (f"image {i}: {int(keep_e.sum())} detections scored >= {score_threshold:g} in eager, "
                    f"{int(keep_o.sum())} in ONNX")
        boxes, labels, scores = (o[k][keep_o].float().cpu() for k in ("boxes", "labels", "scores"))
        free = list(range(len(scores)))
        for box, label, score in zip(*(e[k][keep_e].float().cpu() for k in ("boxes", "labels", "scores"))):
            near = [m for m in free if labels[m] == label and abs(scores[m] - score) <= SCORE_TOL
                    and (boxes[m] - box).abs().max() <= BOX_TOL_PX]
            if not near:
                return (f"image {i}: eager detection (label {int(label)}, score {float(score):.4f}, box "
                        f"{[round(v, 2) for v in box.tolist()]}) has no ONNX match within {BOX_TOL_PX:g} px")
            free.remove(min(near, key=lambda m: float((boxes[m] - box).abs().max())))
    return None


INT8_REFUSAL = ("precision int8 is not offered for task detect: its ONNX export runs per image with "
                "data-dependent post-processing, and published int8 detectors lose 3-6 points of accuracy; use fp32")


def no_int8(fp32: Any, int8: Any, gate: Any) -> tuple[dict, str | None]:
    """Detect's int8 gate: none passes (the config refuses precision int8 for detect; this says why if reached)."""
    return {}, INT8_REFUSAL


class Detect(Task):
    name = "detect"
    verify_runtime = staticmethod(detections)
    int8_gate = staticmethod(no_int8)
    int8_refusal = INT8_REFUSAL
    # A detector's post-processing is data-dependent: traced whole for one image, a Faster R-CNN answered
    # other boxes than eager on the cat photo. So runtime auto exports no detector whole (only when asked
    # for); torchvision's detectors are split instead, backbone and heads on ONNX Runtime and the rest
    # eager (serve/runtimes/onnx/detection.py), and auto takes that split when it passes the check.
    auto_export = False
    torchserve_handler = "object_detector"
    Options = DetectOptions
    Result = Detections
    fixed_size = False

    def blank(self) -> torch.Tensor:
        return torch.zeros((self.spec.preprocess.channels, 320, 320), dtype=torch.uint8)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.spec.preprocess.channels, -1, -1)

    def check(self, output: Any) -> None:
        if "masks" in self.split(output, 1)[0]:  # answered as COCO RLE: refuse to start without the encoder
            require("pycocotools", f"model '{self.spec.name}': detect's instance masks", CheckpointError)

    def decode_sides(self) -> dict[str, int | None]:
        return {"min_side": None, "max_side": self.options.max_side}

    def prepare(self, image: Image.Image, size: tuple[int, int]) -> Prepared:
        width, height = image.size
        scale = min(1.0, self.options.max_side / max(width, height))
        if scale < 1.0:
            target = (max(1, round(width * scale)), max(1, round(height * scale)))
            image = image.resize(target, RESAMPLE[self.spec.preprocess.interpolation], reducing_gap=3.0)
        tensor, content = padded_tensor(image, self.options.max_aspect)
        return Prepared(tensor, size, (image.width / size[0], image.height / size[1]), content)

    def parse_params(self, args: Mapping[str, str]) -> dict[str, Any]:
        threshold = parse_number(args, "threshold", float, 0.0, 1.0)
        return {"threshold": self.options.score_threshold if threshold is None else threshold}

    def collate(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        # Images of any size: a list, never a stacked batch (the model's transform batches them).
        return [x.to(self.device).float().div_(255.0) for x in inputs]

    def query_parameters(self) -> list[dict]:
        return [{"name": "threshold", "in": "query", "required": False,
                 "schema": {"type": "number", "minimum": 0, "maximum": 1},
                 "description": "detect: the lowest score answered (default: the model's score_threshold)"}]

    def summary(self) -> str:
        return f"detect, score_threshold {self.options.score_threshold:g}"

    def run_float(self, forward, inputs):
        return self.split(forward(list(inputs)), len(inputs))

    def split(self, output: Any, count: int) -> list[dict[str, torch.Tensor]]:
        if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], list):
            output = output[1]  # TorchScript detectors answer (losses, detections)
        expected = f"a list of {count} dicts with boxes [K, 4], labels [K] and scores [K]"
        if not isinstance(output, (list, tuple)) or len(output) != count:
            raise self.unfit(output, expected)
        results = []
        for item in output:
            if not isinstance(item, Mapping) or not all(isinstance(item.get(k), torch.Tensor) for k in ("boxes", "labels", "scores")):
                raise self.unfit(output, expected)
            boxes, labels, scores = item["boxes"], item["labels"], item["scores"]
            k = len(scores)
            if boxes.shape != (k, 4) or labels.shape != (k,) or scores.ndim != 1:
                raise self.unfit(item, expected)
            results.append({key: value.detach().float().cpu() if key != "labels" else value.cpu()
                            for key, value in item.items() if isinstance(value, torch.Tensor)})
        return results

    def finish(self, output: dict[str, torch.Tensor], prepared: Prepared, params: dict[str, Any]) -> Detections:
        scores = output["scores"]
        keep = (scores >= params["threshold"]).nonzero().flatten()
        keep = keep[scores[keep].argsort(descending=True, stable=True)][: self.options.max_detections]
        sx, sy = prepared.scale
        width, height = prepared.size
        boxes = output["boxes"][keep] / torch.tensor([sx, sy, sx, sy])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        inside = ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).nonzero().flatten()  # not all padding
        keep, boxes = keep[inside], boxes[inside]
        masks = self._masks(output["masks"][keep], prepared) if "masks" in output else None
        keypoints = None
        if "keypoints" in output:
            points = output["keypoints"][keep].clone()
            points[..., 0] /= sx
            points[..., 1] /= sy
            if "keypoints_scores" in output:
                points[..., 2] = output["keypoints_scores"][keep]
            keypoints = points.tolist()
        detections = []
        for n, i in enumerate(keep.tolist()):
            index = int(output["labels"][i])
            detections.append(Detection(
                label=self.label(index), index=index, score=round(float(scores[i]), 6),
                box=[round(v, 2) for v in boxes[n].tolist()],
                mask=masks[n] if masks is not None else None,
                keypoints=[[round(x, 2), round(y, 2), round(s, 4)] for x, y, s in keypoints[n]] if keypoints else None,
            ))
        return Detections(model=self.spec.name, detections=detections)

    def _masks(self, soft: torch.Tensor, prepared: Prepared) -> list[RleMask]:
        """Soft [K, 1, h, w] masks at the model input's size -> COCO RLE at the uploaded image's size."""
        require("pycocotools", f"model '{self.spec.name}': detect's instance masks", CheckpointError)
        from pycocotools import mask as coco_mask

        if not len(soft):
            return []
        width, height = prepared.size
        if prepared.content is not None:
            soft = soft[..., : prepared.content[1], : prepared.content[0]]
        if soft.shape[-2:] != (height, width):
            soft = torch.nn.functional.interpolate(soft, size=(height, width), mode="bilinear", align_corners=False)
        binary = (soft[:, 0] > self.options.mask_threshold).numpy().astype(np.uint8)
        encoded = coco_mask.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        return [RleMask(size=[int(v) for v in e["size"]], counts=e["counts"].decode("ascii")) for e in encoded]

    def torchserve(self, outputs, prepared, params) -> Any:
        """object_detector's answer: per image a list of {"<label>": [x1, y1, x2, y2], "score": s}."""
        results = [self.finish(o, p, params) for o, p in zip(outputs, prepared)]
        answers = [[{d.label: d.box, "score": d.score} for d in r.detections] for r in results]
        return answers if len(answers) > 1 else answers[0]

    def v2_outputs(self) -> list[dict]:
        return [
            {"name": "boxes", "datatype": "FP32", "shape": [-1, -1, 4]},
            {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
            {"name": "labels", "datatype": "INT64", "shape": [-1, -1]},
            {"name": "count", "datatype": "INT32", "shape": [-1]},
        ]

    def v2_tensors(self, outputs, prepared, params, classification) -> list[V2Output]:
        """The JSON answer's detections as tensors padded to the batch's largest count (zeros)."""
        results = [self.finish(o, p, params).detections for o, p in zip(outputs, prepared)]
        n, k = len(results), max((len(r) for r in results), default=0)
        boxes = np.zeros((n, k, 4), np.float32)
        scores = np.zeros((n, k), np.float32)
        labels = np.zeros((n, k), np.int64)
        for i, detections in enumerate(results):
            for j, d in enumerate(detections):
                boxes[i, j], scores[i, j], labels[i, j] = d.box, d.score, d.index
        count = np.array([len(r) for r in results], np.int32)
        return [V2Output("boxes", "FP32", boxes, boxes.shape), V2Output("scores", "FP32", scores, scores.shape),
                V2Output("labels", "INT64", labels, labels.shape), V2Output("count", "INT32", count, count.shape)]
