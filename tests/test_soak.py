"""The soak script's short version: valid and hostile requests against real gunicorn for 15 s."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from servers import ROOT

pytestmark = [pytest.mark.soak, pytest.mark.server]


def test_short_soak_serves_everything_and_keeps_every_worker(tmp_path):
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, "bench/soak.py", "--seconds", "15", "--clients", "8", "--workers", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    print(result.stdout[-3000:], result.stderr[-3000:])
    assert result.returncode == 0
    report = json.loads(out.read_text())
    assert report["server_errors"] == 0 and report["mismatches"] == {}
    assert report["workers_before"] == report["workers_after"] and report["exit_code"] == 0
    assert report["statuses"].get("200", 0) > 100 and len(report["statuses"]) >= 3  # hostile cases were sent
    assert report["rss_mb_end"] < 2 * report["rss_mb_start"]  # no runaway growth (it was 3x before the malloc fix)
