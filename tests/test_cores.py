"""CoreShare: a lone batch gets every core, concurrent batches (in any forked worker) split them."""
from __future__ import annotations

import os
import time

import torch

from models.tiny import TinyNet
from serve.cores import CoreShare, available_cores


class SetUpNet(TinyNet):
    """TinyNet whose first forward takes 50 ms, as a real network's one-time set-up does."""

    def __init__(self, num_classes: int = 3):
        super().__init__(num_classes)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 1:  # CPU time, not a sleep: the timing counts this thread's CPU time
            until = time.thread_time() + 0.05
            while time.thread_time() < until:
                pass
        return super().forward(x)


def test_a_lone_batch_gets_every_core_and_busy_ones_split_them():
    share = CoreShare(4)
    with share.share() as alone:
        assert alone == 4 and torch.get_num_threads() == 4
        with share.share() as second:
            assert second == 2 and share.busy == 2
            with share.share() as third:
                assert third == 1
    assert share.busy == 0


def test_the_count_is_shared_with_forked_workers():
    share = CoreShare(2)
    read, write = os.pipe()
    with share.share():
        pid = os.fork()
        if pid == 0:  # a second worker starting a batch while the parent's runs
            try:
                with share.share() as threads:
                    os.write(write, str(threads).encode())
            finally:
                os._exit(0)
        os.close(write)
        assert os.read(read, 8) == b"1"
        os.waitpid(pid, 0)
    assert share.busy == 0


def test_available_cores_honours_a_container_cpu_limit(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert available_cores(str(tmp_path)) == affinity  # no cgroup files: the affinity
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cores(str(tmp_path)) == affinity  # no quota
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert available_cores(str(tmp_path)) == 1  # half a CPU still gets one thread
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cores(str(tmp_path)) == 1  # cgroup v1


def test_a_single_threaded_batch_takes_one_thread_and_still_counts_as_busy():
    share = CoreShare(4)
    with share.share(single=True) as small:
        assert small == 1 and torch.get_num_threads() == 1 and share.busy == 1
        with share.share() as big:
            assert big == 2  # the small batch holds a core
    with share.share() as alone:
        assert alone == 4


def test_small_batches_run_single_threaded_and_big_ones_share_the_cores(tmp_path, tiny_checkpoint):
    """Warm-up times a batch-1 forward on one thread; the registry then sets the threads per batch."""
    from conftest import tiny_model_config

    from serve.config import build_config
    from serve.loader import build_module
    from serve.registry import Registry

    resnet18 = tmp_path / "resnet18.pth"
    torch.save(build_module("resnet18", {}).state_dict(), resnet18)
    config = build_config({"models": [
        tiny_model_config(tiny_checkpoint),  # TinyNet on 8x8: microseconds
        tiny_model_config(tiny_checkpoint, name="setup", architecture="test_cores:SetUpNet"),  # small after set-up
        tiny_model_config(resnet18, name="resnet18", architecture="resnet18", kwargs={}, labels=None,
                          preprocess={"resize": 224, "crop": 224}),  # tens of ms on one thread
    ]})
    registry = Registry.load(config)
    try:
        registry.cores = CoreShare(2)

        def threads_for(predictor, size: int) -> int:
            seen = []

            def spy(inputs):
                seen.append(torch.get_num_threads())
                return predictor.predict_batch(inputs)

            batch = [torch.zeros(predictor.input_shape, dtype=torch.uint8)] * size
            registry.batcher.call(registry._run, predictor, spy, batch).result()
            return seen[0]

        tiny, setup, big = (registry.predictors[name] for name in ("tiny", "setup", "resnet18"))
        assert tiny.forward_ms < 2 and setup.forward_ms < 2 and big.forward_ms > 4
        assert threads_for(tiny, 1) == threads_for(setup, 1) == 1 and threads_for(big, 1) == 2
        # The rule is per batch: a batch whose cost adds up past 2 ms shares the cores again.
        tiny.forward_ms = 0.1
        assert threads_for(tiny, 16) == 1 and threads_for(tiny, 32) == 2
    finally:
        registry.close()
