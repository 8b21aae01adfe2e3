"""The rest of the path against the faster forward (issue 11, part 5): per image, on one thread,
the server's own decode + preprocess (Predictor.preprocess: header check, JPEG draft scale, decode,
resize, crop, uint8 tensor) next to ONNX Runtime's batch-1 forward of the default model, and
Pillow's JPEG decode against simplejpeg's (libjpeg-turbo, also decoding at reduced scale), for the
cat photo at 224 x 224 (what bench/bench.py sends), at 451 x 300 (its own size) and upscaled to 12 MP.

    python bench/decode.py          # simplejpeg is a bench-only requirement (bench/requirements.txt)
"""
from __future__ import annotations

import io
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench import photo_jpeg  # noqa: E402


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 2)


def main() -> None:
    import simplejpeg
    from skimage import data

    from serve.config import load_config
    from serve.loader import load_labels, load_model
    from serve.memory import PixelBudget
    from serve.predictor import Predictor

    torch.set_num_threads(1)
    spec = load_config(ROOT / "models" / "models.yaml", env={}).models[0]
    predictor = Predictor(spec, load_model(spec), load_labels(spec), PixelBudget(10**9))
    predictor.warm_up()
    blank = predictor.task.blank()
    print(f"runtime {predictor.describe_runtime()['name']}; one thread throughout")
    own = io.BytesIO()
    Image.fromarray(data.chelsea()).save(own, "JPEG", quality=90)
    photos = {"224x224": photo_jpeg(), "451x300": own.getvalue(), "4000x3000": photo_jpeg((4000, 3000))}
    from serve.cores import sharing_as

    with sharing_as(1):  # the single-threaded session, as a busy worker runs it
        forward = median_ms(lambda: predictor.predict_batch([blank]), 30)
    rows = []
    for label, jpeg in photos.items():
        reps = 10 if label == "4000x3000" else 50
        ours = median_ms(lambda: predictor.preprocess(jpeg), reps)
        pil_full = median_ms(lambda: Image.open(io.BytesIO(jpeg)).convert("RGB").load(), reps)

        def pil_draft():
            image = Image.open(io.BytesIO(jpeg))
            image.draft("RGB", (224, 224))  # the scale our preprocess asks for: shorter side >= 224
            image.convert("RGB").load()

        def turbo_draft():
            simplejpeg.decode_jpeg(jpeg, "RGB", min_height=224, min_width=224)

        row = {"photo": label, "bytes": len(jpeg), "preprocess_ms": ours, "pil_decode_ms": pil_full,
               "pil_draft_decode_ms": median_ms(pil_draft, reps),
               "simplejpeg_decode_ms": median_ms(lambda: simplejpeg.decode_jpeg(jpeg, "RGB"), reps),
               "simplejpeg_draft_decode_ms": median_ms(turbo_draft, reps)}
        rows.append(row)
        print(row, flush=True)
    print(f"batch-1 forward + softmax/top-k (ONNX Runtime, 1 thread): {forward} ms")
    for row in rows:
        print(f"{row['photo']:>9}: preprocess {row['preprocess_ms']} ms = {row['preprocess_ms'] / forward:.2f} x the "
              f"forward; decode at reduced scale Pillow {row['pil_draft_decode_ms']} ms, simplejpeg "
              f"{row['simplejpeg_draft_decode_ms']} ms ({row['pil_draft_decode_ms'] / row['simplejpeg_draft_decode_ms']:.2f} x)")


if __name__ == "__main__":
    main()
