"""Numbers that do not depend on the machine: a fixed thread count and deterministic kernels.

A float sum split over threads is added up in another order when the thread count changes,
so a training run on a 2-core and on a 16-core machine drift apart in the last bits from
the first step and end with different weights (and a different R@K). The stages that
decide the figures (training and evaluation) therefore run with a thread count from
params.yaml, not with "as many as there are cores", in torch and in the BLAS/OpenMP pools
that numpy, scipy and scikit-learn use. On CUDA, deterministic algorithms are requested
(with a warning where an operation has none).

A fixed thread count is not enough across *kinds* of CPU: torch, its oneDNN and MKL kernels
and dlib pick code paths by the CPU (an AVX-512 machine runs other kernels than an AVX2
one), and the spectrograms, face features and trained weights come out different in the last
bits (measured: an AMD EPYC with AVX-512 against the AVX2 one that made dvc.lock; the test R@1
differs within its interval). ``machine_kind`` names what matters; ``reports/reference_machine.json``
records the kind that produced the committed dvc.lock (``python -m speech2face.core.determinism``).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

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


def machine_kind() -> dict[str, str]:
    """What decides the bits of the numeric stages' outputs besides code, params and packages:
    the CPU model and the instruction set torch dispatches to (AVX2, AVX512, ...)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": model, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine()}


if __name__ == "__main__":   # after `dvc repro`: the kind of machine that made dvc.lock
    print(json.dumps(machine_kind(), indent=1))
