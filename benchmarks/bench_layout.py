"""Training steps: channels-last (NHWC) against channels-first (NCHW) weights, and a heap that
keeps freed memory (speech2face.core.allocator) against glibc's default, in the same run.

    .venv/bin/python benchmarks/bench_layout.py [--steps 4] [--threads 2]

Both networks at the pipeline's default sizes (params.yaml), with their training batch,
loss and Adam, as the stages train them (speech2face.training.encoder / .decoder):

- voice encoder: width 0.125, magnitude input, 128-D dlib features, batch 8 of 598 x 257 x 2;
- face decoder: width 0.25, batch 16, texture + landmark + identity loss (the frozen dlib
  replica on 150 x 150 chips, whose layout stays as it is: it gains nothing).

Inputs are random (the cost does not depend on the values). Each configuration gets one
untimed warm-up step, then the median of ``steps`` timed steps. Three per network, in this
order (the heap setting lasts for the process, so it comes last): NCHW and NHWC with glibc's
default (every block above 32 MB back to the kernel when freed), then NHWC with the kept heap,
which is how both training stages run since this comparison. The baseline is NCHW with the
default heap, what they did before.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import figure  # noqa: E402

import torch  # noqa: E402

from speech2face.core.allocator import keep_freed_memory  # noqa: E402
from speech2face.models.face_decoder import FaceDecoder  # noqa: E402
from speech2face.models.losses import EncoderLoss  # noqa: E402
from speech2face.models.voice_encoder import VoiceEncoder  # noqa: E402
from speech2face.training.decoder import DecoderLoss, IdentityNet  # noqa: E402

LAYOUTS = {"channels-first (NCHW)": torch.contiguous_format, "channels-last (NHWC)": torch.channels_last}


def encoder_step(layout: torch.memory_format):
    torch.manual_seed(0)
    model = VoiceEncoder(out_dim=128, width=0.125, input_mode="magnitude").to(memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.999), eps=1e-4)
    loss_fn = EncoderLoss(fdec_weight=0.0, lambda1=0.025, lambda2=0.0)
    spectrograms, features = torch.randn(8, 598, 257, 2), torch.randn(8, 128)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn.terms(features, model(spectrograms))["total"].backward()
        optimizer.step()
    return step


def decoder_step(layout: torch.memory_format, identity_net: IdentityNet):
    torch.manual_seed(0)
    model = FaceDecoder(in_dim=128, width=0.25).to(memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = DecoderLoss(identity_net=identity_net)
    features, textures = torch.randn(16, 128), torch.rand(16, 3, 224, 224)
    landmarks = torch.rand(16, 68, 2) * 0.5 + 0.25

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn.terms(model(features), textures, landmarks, features, 224)["total"].backward()
        optimizer.step()
    return step


def seconds_per_step(step, steps: int) -> float:
    step()   # warm-up: oneDNN picks and caches its kernels on the first call
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the stages' default: 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    identity_net = IdentityNet("dlib")
    networks = {"voice encoder": encoder_step, "face decoder": lambda layout: decoder_step(layout, identity_net)}
    measured: dict[str, dict[str, float]] = {network: {} for network in networks}
    for network, make_step in networks.items():
        for name, layout in LAYOUTS.items():
            measured[network][name] = seconds_per_step(make_step(layout), args.steps)
    kept = "channels-last (NHWC), kept heap"
    if not keep_freed_memory():
        print("the C library is not glibc: no kept-heap measurement")
        kept = None
    figures = []
    for network, make_step in networks.items():
        if kept:
            measured[network][kept] = seconds_per_step(make_step(torch.channels_last), args.steps)
        (baseline, baseline_value), *others = measured[network].items()
        for name, value in others:
            figures.append(figure(f"{network}: seconds per training step, {name}", value, "s", baseline,
                                  baseline_value, better="lower"))
        print(f"{network:14s} {baseline} {baseline_value:.3f} s/step; " + "; ".join(
            f"{name} {value:.3f} s/step ({baseline_value / value:.2f}x faster)" for name, value in others), flush=True)
    return figures


if __name__ == "__main__":
    main()
