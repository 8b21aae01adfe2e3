"""Write a models.yaml and checkpoints for one small model of each task whose answers are known
(models/bright.py, models/tiny.py) into a folder: the README's detect / segment / embed examples.

    python tools/make_task_examples.py /tmp/tasks && SERVE_CONFIG=/tmp/tasks/models.yaml make serve
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.bright import BrightBoxDetector, BrightSegmenter  # noqa: E402
from models.tiny import TinyNet  # noqa: E402

PLAIN = {"mean": [0, 0, 0], "std": [1, 1, 1]}


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(BrightBoxDetector().state_dict(), folder / "boxes.pth")
    torch.save(BrightSegmenter().state_dict(), folder / "regions.pth")
    colours = TinyNet(num_classes=3)  # logits = 2 * channel means + 1
    with torch.no_grad():
        colours.fc.weight.copy_(torch.eye(3) * 2)
        colours.fc.bias.fill_(1.0)
    torch.save(colours.state_dict(), folder / "colours.pth")
    models = [
        {"name": "boxes", "task": "detect", "runtime": "eager", "architecture": "models.bright:BrightBoxDetector",
         "checkpoint": "boxes.pth", "labels": ["__background__", "bright"], "preprocess": PLAIN,
         "detect": {"score_threshold": 0.5, "max_detections": 100}},
        {"name": "regions", "task": "segment", "runtime": "eager", "architecture": "models.bright:BrightSegmenter",
         "checkpoint": "regions.pth", "labels": ["dark", "bright"], "preprocess": {"resize": 320, "crop": 320, **PLAIN}},
        {"name": "colours", "task": "embed", "runtime": "eager", "architecture": "models.tiny:TinyNet", "kwargs": {"num_classes": 3},
         "checkpoint": "colours.pth", "preprocess": {"resize": 8, "crop": 8, **PLAIN}, "embed": {"normalize": True}},
    ]
    (folder / "models.yaml").write_text(yaml.safe_dump({"models": models}, sort_keys=False))
    print(f"wrote {folder / 'models.yaml'} and 3 checkpoints")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "task-examples"))
