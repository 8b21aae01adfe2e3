"""A Hugging Face transformers model folder (save_pretrained: config.json naming `architectures`,
model.safetensors or pytorch_model.bin, preprocessor_config.json): the model built from its config with
no network and no code of the folder's (unless trust_code), its weights read without running pickled
code, and what the folder implies (Implied): the task (from the architecture), the labels (id2label)
and its image processor's preprocessing, pixel for pixel.

Each family's module is wrapped to answer in its task's convention with plain tensors (class scores,
torchvision's detection dicts and segmentation {"out": ...}, a vector per image), so the tasks and the
ONNX export need nothing of their own for it.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from serve.config import ModelSpec
from serve.errors import CheckpointError, ConfigError
from serve.extras import require
from serve.formats.opened import Implied, Opened
from serve.formats.state_dict import error_line, is_state_dict, read_checkpoint
from serve.formats.timm_folder import weights_file
from serve.tasks.classify import Classify
from serve.tasks.detect import Detect
from serve.tasks.embed import Embed
from serve.tasks.segment import Segment

log = logging.getLogger(__name__)

PROCESSOR_FILE = "preprocessor_config.json"
# Embedders: the architecture config.json names -> the image tower built from it, and the output that is
# the model's own image embedding (CLIP's get_image_features = the projected pooled output; SigLIP's
# attention-pooled output; DINOv2's pooler_output = the layer-normed CLS token).
EMBEDDERS = {
    "CLIPModel": ("CLIPVisionModelWithProjection", "image_embeds"),
    "CLIPVisionModelWithProjection": ("CLIPVisionModelWithProjection", "image_embeds"),
    "SiglipModel": ("SiglipVisionModel", "pooler_output"),
    "SiglipVisionModel": ("SiglipVisionModel", "pooler_output"),
    "Dinov2Model": ("Dinov2Model", "pooler_output"),
    "Dinov2WithRegistersModel": ("Dinov2WithRegistersModel", "pooler_output"),
}
# Detectors answering DETR's way: softmax over the classes and a last "no object" class, boxes
# (cx, cy, w, h) relative to the image (DetrImageProcessor.post_process_object_detection).
DETECTORS = ("DetrForObjectDetection",)
# The key prefixes of a two-tower checkpoint that belong to the image tower.
IMAGE_TOWER_KEYS = {"CLIPModel": ("vision_model.", "visual_projection."), "SiglipModel": ("vision_model.",)}
# Image processors whose image steps (PIL backend) are the base ones: resize, center crop, rescale,
# normalize. Beit's and Segformer's own code only reduces segmentation labels; ConvNext's resize is
# its crop_pct rule (below). Any other processor is refused unless the entry writes its preprocess.
PLAIN_PROCESSORS = ("BeitImageProcessorPil", "SegformerImageProcessorPil")
CONVNEXT_PROCESSOR = "ConvNextImageProcessorPil"
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def read_json(path: Path, model: str) -> dict[str, Any]:
    """A JSON object file of the folder.

    Raises:
        ConfigError: unreadable, not JSON, or not an object.
    """
    where = f"model '{model}': field 'checkpoint': {path}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: not a JSON object")
    return data


def architecture(cfg: Mapping[str, Any], folder: Path, model: str) -> str:
    """The one model class config.json names.

    Raises:
        ConfigError: none, or several.
    """
    names = cfg.get("architectures")
    if not isinstance(names, list) or len(names) != 1 or not isinstance(names[0], str):
        raise ConfigError(f"model '{model}': field 'checkpoint': {folder / 'config.json'} names "
                          f"{'no model class' if not names else f'the classes {names}'} in 'architectures'; "
                          f"one is needed (save_pretrained writes it)")
    return names[0]


def task_of(name: str, model: str, remote: bool = False) -> str:
    """The task a model class is served as.

    Raises:
        ConfigError: transformers isn't installed (the 'transformers' extra), doesn't know the class, or
            it is of a family not served.
    """
    require("transformers", f"model '{name}': a transformers folder")
    import transformers
    from transformers.models.auto import modeling_auto

    where = f"model '{model}': field 'checkpoint'"
    if name in EMBEDDERS:
        return Embed.name
    if name in DETECTORS:
        return Detect.name
    if name in _class_names(modeling_auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES) or (
            remote and name.endswith("ForSemanticSegmentation")):
        return Segment.name
    if name in _class_names(modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES) or (
            remote and name.endswith("ForImageClassification")):
        return Classify.name
    if not remote and not hasattr(transformers, name):
        raise ConfigError(f"{where}: the folder's model class '{name}' is not one transformers "
                          f"{transformers.__version__} knows")
    raise ConfigError(
        f"{where}: the folder's model class '{name}' is not served: image classifiers (*ForImageClassification), "
        f"semantic segmenters (*ForSemanticSegmentation), {', '.join(DETECTORS)} and the image towers of "
        f"{', '.join(EMBEDDERS)} are")


def _class_names(mapping: Mapping[str, Any]) -> set[str]:
    names: set[str] = set()
    for value in mapping.values():
        names.update(value if isinstance(value, (list, tuple)) else (value,))
    return names


def refuse_remote_code(cfg: Mapping[str, Any], folder: Path, spec_name: str, trust_code: bool) -> None:
    """Refuse a config whose auto_map points at Python files of the folder, unless trust_code.

    Raises:
        CheckpointError: auto_map without trust_code.
    """
    auto_map = cfg.get("auto_map")
    if auto_map and not trust_code:
        entries = ", ".join(f"{k}: {v}" for k, v in list(auto_map.items())[:4]) if isinstance(auto_map, dict) else auto_map
        raise CheckpointError(
            f"model '{spec_name}': {folder / 'config.json'} has an auto_map ({entries}): its model is code in the "
            f"folder, which transformers would import and run; refused. Set trust_code: true for this model only if "
            f"you trust the folder")


def labels_of(cfg: Mapping[str, Any]) -> tuple[str, ...] | None:
    """id2label as one label per class, in class order; None when there is none."""
    id2label = cfg.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    by_index = {int(k): str(v) for k, v in id2label.items()}
    return tuple(by_index.get(i, str(i)) for i in range(max(by_index) + 1))


def folder_fields(folder: Path, model: str = "?", trust_code: bool = False,
                  own_preprocess: bool = False) -> dict[str, Any]:
    """What a transformers folder answers: its model class, task, labels and preprocess block (the
    latter left out with own_preprocess, where the entry writes its own).

    Raises:
        ConfigError: the class or the image processor can't be served.
        CheckpointError: the config's auto_map (code of the folder) without trust_code.
    """
    cfg = read_json(folder / "config.json", model)
    refuse_remote_code(cfg, folder, model, trust_code)
    name = architecture(cfg, folder, model)
    task = task_of(name, model, remote=bool(cfg.get("auto_map")))
    fields: dict[str, Any] = {"class": name, "task": task}
    labels = labels_of(cfg)
    if labels is not None and task in (Classify.name, Detect.name, Segment.name):
        fields["labels"] = list(labels)
    if not own_preprocess:
        fields["preprocess"] = preprocess_fields(folder, task, model)
    return fields


def load_processor(folder: Path, model: str):
    """The folder's image processor, PIL backend (its settings resolved with the class's defaults).

    Raises:
        ConfigError: no preprocessor_config.json, custom processor code, or transformers can't read it.
    """
    from transformers import AutoImageProcessor

    where = f"model '{model}': field 'checkpoint': {folder}"
    path = folder / PROCESSOR_FILE
    if not path.is_file():
        raise ConfigError(f"{where} has no {PROCESSOR_FILE} (image_processor.save_pretrained writes it): write the "
                          f"entry's preprocess block (resize, crop, mean, std, interpolation) yourself")
    if read_json(path, model).get("auto_map"):
        raise ConfigError(f"{where}: {PROCESSOR_FILE} names processor code of the folder (auto_map), which is never "
                          f"run: write the entry's preprocess block yourself")
    try:
        with _quiet():
            return AutoImageProcessor.from_pretrained(folder, local_files_only=True, backend="pil")
    except Exception as exc:  # transformers' reading of a file of the folder: any failure is the folder's
        raise ConfigError(f"{where}: transformers can't read {PROCESSOR_FILE}: {error_line(exc)}") from None


def preprocess_fields(folder: Path, task: str, model: str = "?") -> dict[str, Any]:
    """The preprocess block that gives the pixels of the folder's image processor.

    Raises:
        ConfigError: a processor or a resize rule this server can't reproduce.
    """
    processor = load_processor(folder, model)
    kind = type(processor).__name__
    where = f"model '{model}': field 'checkpoint': {folder / PROCESSOR_FILE} ({kind.removesuffix('Pil')})"
    mean, std = normalisation(processor)
    if task == Detect.name:
        if not hasattr(processor, "post_process_object_detection"):
            raise ConfigError(f"{where}: not a detection processor")
        return {"interpolation": RESAMPLE_NAMES.get(int(processor.resample), "bilinear")}
    if not _plain(processor):
        raise ConfigError(f"{where}: its own image steps are not reproduced here: write the entry's preprocess block")
    if not processor.do_resize:
        raise ConfigError(f"{where}: do_resize is false (images of any size); write the entry's preprocess block")
    resample = int(processor.resample) if processor.resample is not None else 2
    if resample not in RESAMPLE_NAMES:
        raise ConfigError(f"{where}: resample {resample} is not a PIL filter")
    size, crop = processor.size, processor.crop_size if processor.do_center_crop else None
    fields: dict[str, Any] = {"interpolation": RESAMPLE_NAMES[resample], "mean": mean, "std": std,
                              "crop_offset": "floor", "exact": True, "mode": "RGB"}
    if kind == CONVNEXT_PROCESSOR:
        shortest = size.shortest_edge
        if crop is not None:
            raise ConfigError(f"{where}: a centre crop after ConvNext's own crop is not reproduced")
        if shortest < 384:  # ConvNext's rule: shorter side to shortest_edge / crop_pct, then a centre crop
            return {**fields, "crop_mode": "center", "resize": int(shortest / processor.crop_pct), "crop": shortest}
        return {**fields, "crop_mode": "squash", "resize": shortest, "crop": shortest}
    if size.height and size.width and not (size.shortest_edge or size.longest_edge):
        if size.height != size.width:
            raise ConfigError(f"{where}: size {size.height} x {size.width} is not square; only square inputs are served")
        fields.update(crop_mode="squash", resize=size.height)
    elif size.shortest_edge and not (size.longest_edge or size.height or size.width):
        if task == Segment.name:
            raise ConfigError(f"{where}: size shortest_edge without a crop is not reproduced for segment")
        fields.update(crop_mode="center", resize=size.shortest_edge)
    else:
        rule = {k: v for k, v in dict(size).items() if v}
        raise ConfigError(f"{where}: the resize rule {rule} is not reproduced; write the entry's preprocess block")
    if crop is not None:
        if crop.height != crop.width:
            raise ConfigError(f"{where}: crop_size {crop.height} x {crop.width} is not square")
        if crop.height > fields["resize"]:
            raise ConfigError(f"{where}: crop_size {crop.height} is larger than the resized image ({fields['resize']})")
        fields["crop"] = crop.height
    elif fields["crop_mode"] == "squash" or task == Segment.name:
        fields["crop"] = fields["resize"]
    else:
        raise ConfigError(f"{where}: no centre crop after a shortest_edge resize (images of any shape); write the "
                          f"entry's preprocess block")
    return fields


def _plain(processor) -> bool:
    """Whether the processor's image steps are the PIL backend's own (or only differ for labels)."""
    from transformers.image_processing_backends import PilBackend

    kind = type(processor)
    if kind.__name__ in PLAIN_PROCESSORS or kind.__name__ == CONVNEXT_PROCESSOR:
        return True
    steps = ("_preprocess", "resize", "center_crop", "rescale", "normalize", "process_image", "convert_to_rgb", "preprocess")
    return isinstance(processor, PilBackend) and all(getattr(kind, s) is getattr(PilBackend, s) for s in steps)


def normalisation(processor) -> tuple[list[float], list[float]]:
    """mean and std on the 0-1 scale that give the processor's (pixel * rescale_factor - mean) / std."""
    scale = float(processor.rescale_factor) if processor.do_rescale else 1.0
    if processor.do_normalize:
        mean, std = processor.image_mean, processor.image_std
        mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(m) for m in mean]
        std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(s) for s in std]
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    factor = 255.0 * scale  # (p * scale - m) / s = (p / 255 - m / factor) / (s / factor)
    return [m / factor for m in mean], [s / factor for s in std]


# --- loading --------------------------------------------------------------------------------------


def open_model(spec: ModelSpec, device: torch.device) -> Opened:
    """Build the folder's model, load its weights and wrap it for its task.

    Raises:
        ConfigError: the entry or the folder's config can't be served (see folder_fields).
        CheckpointError: unreadable weights, weights that don't fit, or code of the folder without trust_code.
    """
    folder = spec.checkpoint
    if spec.architecture is not None:
        raise ConfigError(f"model '{spec.name}': field 'architecture': {folder} is a transformers folder, whose "
                          f"config.json names the class; leave architecture (and kwargs) out")
    fields = folder_fields(folder, spec.name, spec.trust_code, own_preprocess=True)
    name, task = fields["class"], fields["task"]
    try:  # the entry's own preprocess fields win one by one (apply_implied)
        fields["preprocess"] = preprocess_fields(folder, task, spec.name)
    except ConfigError:
        if "preprocess" not in spec.model_fields_set:
            raise
        fields["preprocess"] = {}  # a processor not reproduced: the entry's preprocess block is all there is
    if "task" in spec.model_fields_set and spec.task != task:
        raise ConfigError(f"model '{spec.name}': field 'task': {folder} holds a {name}, served as task '{task}', "
                          f"not '{spec.task}'")
    cfg = read_json(folder / "config.json", spec.name)
    trusted = bool(cfg.get("auto_map"))
    if trusted:
        log.warning("model '%s': importing the model code of %s because trust_code is set: it runs the folder's code",
                    spec.name, folder)
    path = weights_file(folder)
    weights = read_checkpoint(path, "cpu")  # safetensors, or torch.load(weights_only=True): no pickled code runs
    if not is_state_dict(weights):
        raise CheckpointError(f"model '{spec.name}': {path} holds a {type(weights).__name__}, not a state_dict")
    model, skipped = build(folder, name, cfg, weights, spec, trusted)
    module = wrap(model, name, task, folder, spec.name)
    implied = Implied(task=task, labels=tuple(fields["labels"]) if "labels" in fields else None,
                      preprocess=fields.get("preprocess", {}))
    return Opened(module, f"transformers folder ({name}, {path.name})", implied, skipped)


def build(folder: Path, name: str, cfg: Mapping[str, Any], weights: dict[str, torch.Tensor], spec: ModelSpec,
          trusted: bool) -> tuple[nn.Module, tuple[str, ...]]:
    """The model class built from the folder's config (read with local_files_only) and the weights loaded by
    transformers' own loader (its renames of older checkpoints' keys), strictly unless strict: false.

    Raises:
        ConfigError: the class can't be built from the config.
        CheckpointError: missing, unexpected or mis-shaped weights.
    """
    import transformers
    from transformers import AutoConfig

    where = f"model '{spec.name}': {folder}"
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trusted)
    except Exception as exc:  # transformers' reading of the folder's config: any failure is the folder's
        raise ConfigError(f"model '{spec.name}': field 'checkpoint': transformers can't read "
                          f"{folder / 'config.json'}: {error_line(exc)}") from None
    if trusted:
        cls = _remote_class(folder, cfg, name, spec.name)
    else:
        tower, _ = EMBEDDERS.get(name, (name, None))
        cls = getattr(transformers, tower)
        if tower != name and name in IMAGE_TOWER_KEYS:  # a two-tower model: its image tower only
            vision = config.vision_config
            if hasattr(config, "projection_dim"):
                vision.projection_dim = config.projection_dim
            config = vision
            weights = {k: v for k, v in weights.items() if k.startswith(IMAGE_TOWER_KEYS[name])}
    try:
        with _quiet():
            model, info = cls.from_pretrained(None, config=config, state_dict=weights, dtype=torch.float32,
                                              local_files_only=True, output_loading_info=True)
    except Exception as exc:  # the library's constructor and loader on the folder's config and weights
        raise CheckpointError(f"{where}: building {cls.__name__} from its config and weights failed: "
                              f"{error_line(exc)}") from None
    problems = [f"{len(info[k])} {k.replace('_', ' ')}: {', '.join(sorted(map(str, info[k]))[:5])}"
                for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
    if problems and spec.strict:
        raise CheckpointError(f"{where}: the weights do not fit {cls.__name__}: " + "; ".join(problems))
    if problems:
        log.warning("model '%s': non-strict load: %s", spec.name, "; ".join(problems))
    skipped = tuple(sorted(map(str, info.get("unexpected_keys") or ()))) + tuple(
        sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ()))
    return model.eval(), skipped


def _remote_class(folder: Path, cfg: Mapping[str, Any], name: str, model: str):
    """The class config.json's auto_map names for the architecture (trust_code only): imported from the folder.

    Raises:
        ConfigError: auto_map names no class of that name.
    """
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    auto_map = cfg.get("auto_map") or {}
    refs = [ref for ref in auto_map.values() if isinstance(ref, str) and ref.rsplit(".", 1)[-1] == name]
    if not refs:
        raise ConfigError(f"model '{model}': field 'checkpoint': {folder / 'config.json'}'s auto_map names no class "
                          f"'{name}' (it has {sorted(auto_map)})")
    return get_class_from_dynamic_module(refs[0], str(folder), local_files_only=True)


@contextmanager
def _quiet():
    """transformers' loading progress bar off while it loads (it would write to the server's log); put back after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


# --- the wrappers: the task's convention, plain tensors ------------------------------------------


class ClassScores(nn.Module):
    """An image classifier: pixel_values -> logits [N, classes]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).logits


class ImageEmbedding(nn.Module):
    """An image tower: pixel_values -> its own embedding [N, D] (the output named `field`)."""

    def __init__(self, model: nn.Module, field: str):
        super().__init__()
        self.model = model
        self.field = field

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(pixel_values=pixels), self.field)


class SegmentationScores(nn.Module):
    """A semantic segmenter: pixel_values -> {"out": logits bilinearly upsampled to the input's size}, as
    torchvision's segmenters answer (SegFormer's own logits are a quarter of it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.model(pixel_values=pixels).logits
        if logits.shape[-2:] != pixels.shape[-2:]:
            logits = nn.functional.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        return {"out": logits}


class DetrDetections(nn.Module):
    """A DETR detector in torchvision's convention: a list of float [3, H, W] images in 0-1 -> one dict per
    image of boxes (x1, y1, x2, y2 in that image's pixels), labels and scores, for every query.

    The processor's steps, as its default (torchvision) backend runs them: the 0-1 image back to its
    uint8 pixels, resized with torchvision (antialiased) by the shortest_edge / longest_edge rule,
    rescaled and normalised, padded below and right to the batch's largest with a pixel mask; then
    post_process_object_detection's rule: softmax, the last ("no object") class dropped, boxes from
    (cx, cy, w, h) relative to the image to corners in its pixels."""

    def __init__(self, model: nn.Module, processor):
        super().__init__()
        from transformers.image_utils import pil_torch_interpolation_mapping

        self.model = model
        size = processor.size
        if not (size.shortest_edge and size.longest_edge) and not (size.height and size.width):
            raise ConfigError(f"{type(processor).__name__}: the resize rule {dict(size)} is not reproduced")
        self.size = (size.shortest_edge, size.longest_edge, size.height, size.width)
        self.do_resize = bool(processor.do_resize)
        self.interpolation = pil_torch_interpolation_mapping[int(processor.resample)]
        scale = float(processor.rescale_factor) if processor.do_rescale else 1.0
        mean, std = normalisation(processor)  # on the 0-1 scale; times 255: the uint8 pixels' (fused as HF does)
        if not processor.do_normalize:
            mean, std = [0.0] * 3, [1.0 / (255.0 * scale)] * 3
        self.register_buffer("mean", torch.tensor(mean).mul(255.0).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).mul(255.0).view(3, 1, 1), persistent=False)
        self.do_pad = bool(processor.do_pad)

    def _target(self, height: int, width: int) -> tuple[int, int]:
        from transformers.image_transforms import get_size_with_aspect_ratio

        shortest, longest, fixed_h, fixed_w = self.size
        if not self.do_resize:
            return height, width
        if shortest and longest:
            return get_size_with_aspect_ratio((height, width), shortest, longest)
        return fixed_h, fixed_w

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        from torchvision.transforms.v2 import functional as tvF
        from transformers.image_transforms import center_to_corners_format

        resized = []
        for image in images:
            pixels = image.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
            target = self._target(*pixels.shape[-2:])
            if tuple(target) != tuple(pixels.shape[-2:]):
                pixels = tvF.resize(pixels, list(target), interpolation=self.interpolation, antialias=True)
            resized.append(pixels.float().sub_(self.mean).div_(self.std))
        height, width = max(r.shape[-2] for r in resized), max(r.shape[-1] for r in resized)
        if not self.do_pad and any(r.shape[-2:] != (height, width) for r in resized):
            raise ValueError("images of different sizes need do_pad")
        batch = resized[0].new_zeros((len(resized), 3, height, width))
        mask = torch.zeros((len(resized), height, width), dtype=torch.int64, device=batch.device)
        for i, r in enumerate(resized):
            batch[i, :, : r.shape[-2], : r.shape[-1]] = r
            mask[i, : r.shape[-2], : r.shape[-1]] = 1
        outputs = self.model(pixel_values=batch, pixel_mask=mask)
        scores, labels = outputs.logits.softmax(-1)[..., :-1].max(-1)
        boxes = center_to_corners_format(outputs.pred_boxes)
        results = []
        for i, image in enumerate(images):
            h, w = image.shape[-2:]
            scale = torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
            results.append({"boxes": boxes[i] * scale, "labels": labels[i], "scores": scores[i]})
        return results


def wrap(model: nn.Module, name: str, task: str, folder: Path, spec_name: str) -> nn.Module:
    """The model in its task's convention (see the wrappers above)."""
    if task == Classify.name:
        return ClassScores(model).eval()
    if task == Segment.name:
        return SegmentationScores(model).eval()
    if task == Embed.name:
        return ImageEmbedding(model, EMBEDDERS[name][1]).eval()
    return DetrDetections(model, load_processor(folder, spec_name)).eval()
