"""Busy host: a lone request at a time to the default model, quiet and beside CPU-bound neighbours
(busy loops in this process's scheduling group: tests/busy_host.py says why),
for the default settings and the same server pinned to one thread per worker (SERVE_TORCH_THREADS=1),
with runtime eager and runtime auto (ONNX Runtime). The servers take turns block by block, so each
pair is measured in the same conditions. tests/test_busy_host.py asserts the busy ratio; this prints
the figures.

    python bench/busy.py [--neighbours 2] [--blocks 8]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from busy_host import lone_requests, neighbours, summary  # noqa: E402
from servers import Server  # noqa: E402
from soak import cat_jpeg  # noqa: E402

from serve.cores import available_cores  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--neighbours", type=int, default=available_cores())
    parser.add_argument("--blocks", type=int, default=8)
    args = parser.parse_args()
    body, workdir = cat_jpeg(), Path(tempfile.mkdtemp(prefix="busy-"))
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "cores": available_cores(), "neighbours": args.neighbours}
    for runtime in ("eager", "auto"):
        base = {"SERVE_DEVICE": "cpu", "SERVE_RUNTIME": runtime}
        servers = {"default": Server(base, workdir / f"{runtime}-default.log", inherit_settings=False),
                   "pinned": Server({**base, "SERVE_TORCH_THREADS": "1"}, workdir / f"{runtime}-pinned.log",
                                    inherit_settings=False)}
        urls = {label: server.url for label, server in servers.items()}
        try:
            # Quiet: block by block, each block's first 1.5 s uncounted (each server would count the
            # other's work as other processes' load). Busy: request by request, as the test does (the
            # busy loops alone hold a core, and both servers meet the same moment-to-moment swings).
            quiet = summary(lone_requests(urls, body, blocks=args.blocks))
            with neighbours(args.neighbours):
                time.sleep(1.0)
                busy = summary(lone_requests(urls, body, blocks=args.blocks * 10, per_block=1, lead_s=0))
        finally:
            for server in servers.values():
                server.stop()
        report[runtime] = {"quiet": quiet, "busy": busy,
                           "busy_ratio_default_to_pinned": round(busy["default"]["p50_ms"] / busy["pinned"]["p50_ms"], 2)}
        for phase, figures in (("quiet", quiet), ("busy", busy)):
            print(f"{runtime:5} {phase:5}: default p50 {figures['default']['p50_ms']} ms (p90 {figures['default']['p90_ms']}), "
                  f"pinned p50 {figures['pinned']['p50_ms']} ms (p90 {figures['pinned']['p90_ms']})", flush=True)
        print(f"{runtime:5} busy: default / pinned p50 = {report[runtime]['busy_ratio_default_to_pinned']}", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
