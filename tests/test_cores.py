"""CoreShare: a lone batch gets every core, concurrent batches (in any forked worker) split them."""
from __future__ import annotations

import os

import torch

from serve.cores import CoreShare, available_cores


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
            with share.share() as threads:
                os.write(write, str(threads).encode())
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
