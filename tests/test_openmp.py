"""Freeing a thread's idle OpenMP team (server/engines/torch/openmp.py): the helper threads really go,
and torch computes the same afterwards (a new team is made on the next parallel region)."""

from __future__ import annotations

import os

import pytest
import torch

from server.engines.torch.openmp import _runtime, release_idle_team


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc to count threads")
def test_release_frees_the_idle_team_and_torch_still_computes():
    if _runtime() is None:
        pytest.skip("torch's OpenMP runtime has no omp_pause_resource_all here")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(512, 512)
        want = x @ x  # a parallel region: the team's helper thread now exists, idle
        before = _os_threads()
        assert release_idle_team()
        assert _os_threads() < before
        torch.testing.assert_close(x @ x, want)
    finally:
        torch.set_num_threads(threads)
