"""Shared test fixtures, and the suite's settings for parallel runs.

The suite runs on two cores in CI as two pytest-xdist workers (``-n 2``, see the README).
Each worker then uses one intra-op thread, and so do the processes it starts (``OMP_NUM_THREADS``):
two workers with two threads each would oversubscribe the cores, and a 2-thread op waits at its
barrier whenever the other worker holds the second core.
"""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """Two shared cores: one intra-op thread avoids oversubscription (restored for other test files)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
