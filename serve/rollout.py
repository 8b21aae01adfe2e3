"""Rollout reports: the generation each worker applied (<state_dir>/workers/<pid>), and how many serve a change."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

WORKERS_DIR = "workers"
SWITCH_WAIT_S = 10.0  # how long a management call waits for the other workers to switch


@dataclass(frozen=True)
class Rollout:
    """How far a change got: the workers serving it (switched), those that could not (failed)."""

    generation: int
    workers: int
    switched: int
    failed: int

    @classmethod
    def alone(cls, generation: int) -> Rollout:
        """A process without a state_dir: the only worker, and it applied the change."""
        return cls(generation, workers=1, switched=1, failed=0)

    def to_dict(self) -> dict:
        return {"generation": self.generation, "workers": self.workers, "switched": self.switched,
                "failed": self.failed}


class WorkerReports:
    """`<state_dir>/workers/<pid>`: {"generation": what that worker serves, "failed": [models it could not apply]}."""

    def __init__(self, state_dir: Path):
        self.folder = Path(state_dir) / WORKERS_DIR

    def write(self, generation: int, failed: list[str]) -> None:
        """Tell the worker that takes the next call which generation this one serves, and what failed."""
        self.folder.mkdir(exist_ok=True)
        temporary = self.folder / f".{os.getpid()}.tmp"
        temporary.write_text(json.dumps({"generation": generation, "failed": failed}))
        os.replace(temporary, self.folder / str(os.getpid()))

    def siblings(self) -> dict[int, dict]:
        """What the other live workers of this server last reported (a dead one's report is removed)."""
        found: dict[int, dict] = {}
        for path in self.folder.glob("[0-9]*"):
            pid = int(path.name)
            if pid == os.getpid():
                continue
            if not _is_sibling(pid):
                path.unlink(missing_ok=True)
                continue
            try:
                found[pid] = json.loads(path.read_text())
            except (OSError, ValueError):
                found[pid] = {"generation": -1, "failed": []}
        return found

    def await_generation(self, generation: int, name: str) -> Rollout:
        """Wait (SWITCH_WAIT_S at most) until every other worker has applied `generation`; count those
        that did, less those that could not apply model `name`."""
        deadline = time.monotonic() + SWITCH_WAIT_S
        while True:
            others = self.siblings()
            done = {pid: r for pid, r in others.items() if r.get("generation", -1) >= generation}
            if len(done) == len(others) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        failed = sum(1 for r in done.values() if name in r.get("failed", []))
        return Rollout(generation, workers=len(others) + 1, switched=len(done) + 1 - failed, failed=failed)


def _is_sibling(pid: int) -> bool:
    """Whether `pid` is alive and another worker of this gunicorn master (its parent is ours)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return int(stat.rsplit(")", 1)[1].split()[1]) == os.getppid()
