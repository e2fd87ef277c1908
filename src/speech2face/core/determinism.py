"""Numbers that do not depend on the machine: a fixed thread count and deterministic kernels.

A float sum split over threads is added up in another order when the thread count changes,
so a training run on a 2-core and on a 16-core machine drift apart in the last bits from
the first step and end with different weights (and a different R@K). The stages that
decide the figures (training and evaluation) therefore run with a thread count from
params.yaml, not with "as many as there are cores", in torch and in the BLAS/OpenMP pools
that numpy, scipy and scikit-learn use. On CUDA, deterministic algorithms are requested
(with a warning where an operation has none).
"""

from __future__ import annotations

import os

import torch


def fix_threads(threads: int) -> None:
    """Run torch and the native thread pools with ``threads`` threads, deterministically."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)   # stays in force: the object is only needed to undo it
    # cuBLAS reproducibility needs this before the first CUDA call; harmless without CUDA
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
