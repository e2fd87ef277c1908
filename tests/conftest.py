"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """oneDNN convolutions on 2 threads slow down 10-50x when another process holds a core
    (measured on this project's shared 2-core machines); one thread is steady. Modules that
    time or train torch networks use it with ``pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
