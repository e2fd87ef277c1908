"""Voice-encoder training at the paper's full size: samples/s, peak memory, FLOP/s vs peak.

    .venv/bin/python benchmarks/bench_training.py [--batch 2] [--steps 3] [--frames 598]

The model is speech2face.models.voice_encoder.VoiceEncoder(out_dim=4096, width=1.0, input_mode="complex")
(148 M parameters) on 598 x 257 x 2 spectrograms, trained as speech2face.training.encoder does:
Adam (EncoderConfig's settings), the encoder loss (normalised-L2 term), batches from
speech2face.data.pairs.PairDataset (random time roll) through a DataLoader over the
memory-mapped spectrogram shards of data/spectrograms; where that folder is absent,
synthetic shards of the same format are written to a temp folder. Face features are
random 4096-D vectors (the loss value does not change the cost).

FLOPs: torch.utils.flop_counter.FlopCounterMode on the first (warm-up) step, checked
against an analytic count of the convolutions and linear layers (forward 2*MACs; backward
the gradients of weights and inputs, 2*MACs each, except no input gradient for the first
convolution). Batch norm, ReLU, pooling, the loss and Adam are left out of both (a few %).
Achieved FLOP/s = counted FLOPs per step / compute time per step (data wait excluded);
the device's peak is estimated in the same run by timing a large matrix product
(torch.mm 4096x4096 on the CPU, 8192x8192 on a GPU), per dtype.

bf16: on a GPU, training steps under bf16 autocast, and torch.compile (GPU only). On a CPU
without native bf16 instructions, bf16 autocast runs through slow emulated kernels: the
comparison is made on the model's largest convolution (Table 1's third, 64->128 on
589x248) on a time-cropped input, forward + backward, and a whole bf16 step is run only
when bf16 is at least half as fast as fp32 there.

Data wait: seconds per step spent waiting for the DataLoader (the time between the end of
one step and the arrival of the next batch), as speech2face.training.encoder measures it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import ROOT, PeakMemory, figure  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from speech2face.models.losses import EncoderLoss  # noqa: E402
from speech2face.models.voice_encoder import VoiceEncoder, count_parameters  # noqa: E402
from speech2face.data.pairs import PairDataset, Pairs  # noqa: E402
from speech2face.data.spectrogram_files import open_spectrograms  # noqa: E402
from speech2face.core.tables import OK, write_table  # noqa: E402
from speech2face.training.encoder import EncoderConfig  # noqa: E402
from speech2face.training.loop import make_optimizer  # noqa: E402

OUT_DIM, WIDTH, INPUT_MODE = 4096, 1.0, "complex"
FULL_FRAMES, N_FREQ = 598, 257
# The shortest input Table 1's convolutions and pools accept (time axis); quick runs use it.
MIN_FRAMES = 259


def make_model(device: torch.device | str = "cpu") -> VoiceEncoder:
    return VoiceEncoder(out_dim=OUT_DIM, width=WIDTH, input_mode=INPUT_MODE).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- FLOPs

def analytic_flops(batch: int, frames: int, n_freq: int = N_FREQ) -> dict[str, int]:
    """FLOPs of one forward + backward of the convs and linears, from their shapes.

    Shapes come from a forward pass on the meta device (no memory, no arithmetic).
    """
    with torch.device("meta"):
        model = VoiceEncoder(out_dim=OUT_DIM, width=WIDTH, input_mode=INPUT_MODE, n_freq=n_freq)
    layers: list[tuple[torch.nn.Module, torch.Size]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: layers.append((m, o.shape)))
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    model(torch.empty(batch, frames, n_freq, 2, device="meta"))
    for hook in hooks:
        hook.remove()
    forward = backward = 0
    for position, (layer, out_shape) in enumerate(layers):
        if isinstance(layer, torch.nn.Conv2d):
            kh, kw = layer.kernel_size
            macs = out_shape.numel() * (layer.in_channels // layer.groups) * kh * kw
        else:
            macs = out_shape.numel() * layer.in_features
        forward += 2 * macs
        backward += 2 * macs                      # weight gradient
        if position > 0:                          # the input spectrogram needs no gradient
            backward += 2 * macs
    return {"forward": forward, "backward": backward, "total": forward + backward}


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """FLOP/s of the fastest of ``repeats`` (n x n) @ (n x n) products."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)  # warm-up
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# ---------------------------------------------------------------------------- data

def synthetic_shards(folder: Path, n_clips: int, seed: int = 0) -> Path:
    """Spectrogram-stage shards (format: speech2face.data.spectrogram_files) of random float16 values."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    array = np.lib.format.open_memmap(folder / "shard-00000.npy", mode="w+", dtype=np.float16,
                                      shape=(n_clips, FULL_FRAMES, N_FREQ, 2))
    for i in range(n_clips):
        array[i] = rng.standard_normal((FULL_FRAMES, N_FREQ, 2), dtype=np.float32)
    array.flush()
    del array
    write_table(pd.DataFrame({"clip_id": [f"synthetic{i:05d}" for i in range(n_clips)], "row": range(n_clips),
                              "status": OK, "reason": "", "source_seconds": 6.0, "shard": "shard-00000"}),
                folder / "index.csv")
    return folder


def training_pairs(n_needed: int, tmp: Path, seed: int = 0) -> tuple[Pairs, str]:
    """Pairs over memory-mapped spectrogram shards: data/spectrograms, else synthetic ones."""
    folder = ROOT / "data/spectrograms"
    origin = "data/spectrograms (memory-mapped shards of the spectrogram stage)"
    try:
        index, arrays = open_spectrograms(folder)
        index = index[index["status"] == OK]
        if len(index) < n_needed or any(a.shape[1:] != (FULL_FRAMES, N_FREQ, 2) for a in arrays.values()):
            raise ValueError("too few or differently shaped spectrograms")
    except (FileNotFoundError, ValueError, OSError) as error:
        origin = f"synthetic memory-mapped shards in a temp folder (data/spectrograms unusable: {error})"
        index, arrays = open_spectrograms(synthetic_shards(tmp / "spectrograms", max(n_needed, 8), seed))
        index = index[index["status"] == OK]
    table = pd.DataFrame({"clip_id": index["clip_id"].to_numpy(), "spec_shard": index["shard"].to_numpy(),
                          "spec_row": index["row"].astype(int).to_numpy()})
    features = np.random.default_rng(seed).standard_normal((len(table), OUT_DIM), dtype=np.float32)
    return Pairs(table, arrays, features), origin


def endless_batches(pairs: Pairs, batch: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(PairDataset(pairs, augment=True), batch_size=batch, shuffle=True,
                                         drop_last=True, num_workers=EncoderConfig().loader_workers,
                                         generator=generator)
    while True:
        yield from loader


class Float32PairDataset(PairDataset):
    """The loader as it was: each spectrogram converted to float32 inside the loader."""

    def __getitem__(self, i: int):
        spectrogram, feature = super().__getitem__(i)
        return spectrogram.float(), feature


def loader_throughput(pairs: Pairs, batch: int, workers: int, float32_in_loader: bool,
                      samples: int = 400) -> float:
    """Samples/s the training DataLoader delivers (shuffled, time roll on), no model."""
    dataset = (Float32PairDataset if float32_in_loader else PairDataset)(pairs, augment=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(0))
    seen, start = 0, None
    while seen < samples:
        for spectrogram, _ in loader:
            if start is None:   # the first batch pays for starting the workers
                start = time.perf_counter()
                continue
            seen += len(spectrogram)
            if seen >= samples:
                break
    return seen / (time.perf_counter() - start)


# ------------------------------------------------------------------------ training

def run_training(pairs: Pairs, device: torch.device, batch: int, steps: int, frames: int,
                 bf16: bool = False, compile_model: bool = False, warmup: int = 1,
                 count_flops: bool = True, seed: int = 0) -> dict:
    """``warmup`` untimed steps (the first one FLOP-counted), then ``steps`` timed ones."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(seed)
    result: dict = {"batch": batch, "frames": frames, "steps": steps, "warmup_steps": warmup,
                    "autocast": "bf16" if bf16 else None, "compiled": compile_model}
    with PeakMemory(cuda=device.type == "cuda") as memory:
        model = make_model(device)
        forward = torch.compile(model) if compile_model else model
        optimizer, _ = make_optimizer(model, EncoderConfig())
        loss_fn = EncoderLoss(fdec_weight=0.0)
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16
                    else contextlib.nullcontext())
        batches = endless_batches(pairs, batch, seed)

        def step(spectrogram: torch.Tensor, feature: torch.Tensor) -> None:
            spectrogram = spectrogram[:, :frames].to(device, non_blocking=True).float()
            feature = feature.to(device)
            with autocast:
                predicted = forward(spectrogram)
            loss = loss_fn.terms(feature, predicted.float())["total"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        warmup_seconds = []
        for i in range(warmup):
            spectrogram, feature = next(batches)
            start = time.perf_counter()
            if i == 0 and count_flops:
                with FlopCounterMode(display=False) as counter:
                    step(spectrogram, feature)
                result["counted_flops_per_step"] = int(counter.get_total_flops())
                result["counted_flops_by_op"] = {str(op): int(n) for op, n in
                                                 counter.get_flop_counts().get("Global", {}).items()}
            else:
                step(spectrogram, feature)
            synchronize(device)
            warmup_seconds.append(time.perf_counter() - start)
        waits, totals = [], []
        tick = time.perf_counter()
        for _ in range(steps):
            spectrogram, feature = next(batches)
            waits.append(time.perf_counter() - tick)
            step(spectrogram, feature)
            synchronize(device)
            now = time.perf_counter()
            totals.append(now - tick)
            tick = now
    trainable, _ = count_parameters(model)
    step_seconds = float(np.mean(totals))
    wait_seconds = float(np.mean(waits))
    result.update({
        "parameters": trainable,
        "warmup_seconds": warmup_seconds,
        "step_seconds": totals,
        "data_wait_seconds": waits,
        "mean_step_seconds": step_seconds,
        "mean_data_wait_seconds": wait_seconds,
        "mean_compute_seconds": step_seconds - wait_seconds,
        "samples_per_second": batch / step_seconds,
        # weights, gradients and Adam's two moments: 16 bytes per parameter in float32
        "static_state_mb": 16 * trainable / 2**20,
        "memory": memory.as_dict(),
    })
    return result


def conv_layer_comparison(device: torch.device, frames: int, repeats: int) -> dict:
    """Forward + backward of Table 1's third convolution (64 -> 128, 4x4) in fp32 and under
    bf16 autocast, on (1, 64, frames, 251): passes/s and FLOP/s of each."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 128, kernel_size=4).to(device)
    x = torch.randn(1, 64, frames, 251, device=device, requires_grad=True)
    out_numel = 128 * (frames - 3) * 248
    flops = 3 * 2 * out_numel * 64 * 16  # forward, input gradient, weight gradient
    result = {"layer": "Conv2d(64, 128, 4) on (1, 64, %d, 251)" % frames, "flops_per_pass": flops}
    for name, enabled in (("fp32", False), ("bf16_autocast", True)):
        def one_pass() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
                y = conv(x)
            y.float().sum().backward()
        one_pass()  # warm-up (kernel choice, allocation)
        synchronize(device)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            one_pass()
            synchronize(device)
            best = min(best, time.perf_counter() - start)
        result[name] = {"seconds": best, "passes_per_second": 1 / best, "flops_per_second": flops / best}
    return result


# ----------------------------------------------------------------------- the whole

def measure(quick: bool = False, batch: int | None = None, steps: int | None = None,
            frames: int | None = None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    batch = batch or (32 if gpu else (1 if quick else 2))
    steps = steps or (20 if gpu else (1 if quick else 2))
    frames = frames or (MIN_FRAMES if quick else FULL_FRAMES)
    warmup = 3 if gpu else 1
    result: dict = {"device": str(device), "model": f"VoiceEncoder(out_dim={OUT_DIM}, width={WIDTH}, "
                    f"input_mode={INPUT_MODE!r})", "input": [frames, N_FREQ, 2], "skipped": []}
    figures: list[dict] = []

    mm_n = 8192 if gpu else 4096
    peak = {"fp32": matmul_peak(device, torch.float32, mm_n, 3 if not quick else 1)}
    bf16_mm_n = mm_n if gpu else 1024   # emulated bf16 on a CPU: 1024 already takes seconds
    peak["bf16"] = matmul_peak(device, torch.bfloat16, bf16_mm_n, 1 if not gpu else 3)
    result["matmul_peak_flops"] = peak
    result["matmul_peak_method"] = (f"best of timed torch.mm ({mm_n}x{mm_n}, fp32; {bf16_mm_n}x{bf16_mm_n}, "
                                    f"bf16) on {device}, measured in this run")

    analytic = analytic_flops(batch, frames)
    result["analytic_flops_per_step"] = analytic
    with tempfile.TemporaryDirectory(prefix="s2f-bench-train-") as tmp:
        pairs, origin = training_pairs(max(batch, 64), Path(tmp))  # the loader cycles through them
        result["data"] = origin
        fp32 = run_training(pairs, device, batch, steps, frames, warmup=warmup)
        result["fp32"] = fp32
        counted = fp32["counted_flops_per_step"]
        figures.append(figure("FLOPs per sample (FlopCounterMode) vs analytic count", counted / batch, "FLOP",
                              "analytic conv + linear count", analytic["total"] / batch, "higher",
                              "cross-check: ratio 1 means the two counts agree"))
        compute_rate = counted / fp32["mean_compute_seconds"]
        figures.append(figure(f"fp32 training, batch {batch}", fp32["samples_per_second"], "samples/s",
                              "samples/s at the fp32 matmul peak", peak["fp32"] / (counted / batch), "higher",
                              "ratio = share of the device's peak reached"))
        figures.append(figure("fp32 achieved FLOP/s", compute_rate, "FLOP/s", "fp32 matmul peak (timed torch.mm)",
                              peak["fp32"], "higher", "ratio = share of the peak; data wait excluded"))
        mem = fp32["memory"]
        peak_mb = mem["cuda_peak_mb"] if gpu else mem["peak_extra_mb"]
        figures.append(figure("fp32 training peak memory" + (" (CUDA allocated)" if gpu else " (RSS added)"),
                              peak_mb, "MB", "weights + gradients + Adam moments (16 B/parameter)",
                              fp32["static_state_mb"], "lower", "ratio = peak / unavoidable training state"))
        figures.append(figure("data wait per step (PairDataset over memory-mapped shards)",
                              fp32["mean_data_wait_seconds"] * 1e3, "ms", "training step time",
                              fp32["mean_step_seconds"] * 1e3, "lower", "ratio = share of the step spent waiting"))

        for i in range(len(pairs)):   # page cache warm for both loaders, as after a first epoch
            pairs.spectrogram(i).sum()
        for workers in (0, 2):
            loader_batch = 8   # the paper's batch
            stored = loader_throughput(pairs, loader_batch, workers, float32_in_loader=False, samples=80 if quick else 400)
            as_float32 = loader_throughput(pairs, loader_batch, workers, float32_in_loader=True,
                                           samples=80 if quick else 400)
            figures.append(figure(f"training data loader, {workers} worker processes, batch {loader_batch}",
                                  stored, "samples/s", "the same loader converting to float32 itself",
                                  as_float32, "higher", "float16 as stored, converted on the device"))

        if gpu:
            bf16 = run_training(pairs, device, batch, steps, frames, bf16=True, warmup=warmup, count_flops=False)
            result["bf16_autocast"] = bf16
            figures.append(figure(f"bf16 autocast training, batch {batch}", bf16["samples_per_second"], "samples/s",
                                  "fp32 training", fp32["samples_per_second"], "higher"))
            figures.append(figure("bf16 achieved FLOP/s", counted / bf16["mean_compute_seconds"], "FLOP/s",
                                  "bf16 matmul peak (timed torch.mm)", peak["bf16"], "higher"))
            try:
                compiled = run_training(pairs, device, batch, steps, frames, bf16=True, compile_model=True,
                                        warmup=warmup, count_flops=False)
                result["bf16_autocast_compiled"] = compiled
                figures.append(figure(f"torch.compile + bf16 autocast, batch {batch}",
                                      compiled["samples_per_second"], "samples/s", "bf16 autocast, eager",
                                      bf16["samples_per_second"], "higher",
                                      f"compile + warm-up {sum(compiled['warmup_seconds']):.1f} s not included"))
            except Exception as error:  # a compiler failure is a finding, not a crash of the suite
                result["skipped"].append({"name": "torch.compile", "reason": f"failed: {error!r}"[:300]})
        else:
            result["skipped"].append({"name": "torch.compile",
                                      "reason": "no GPU in this run: torch.compile is benchmarked on a GPU only"})
            layer = conv_layer_comparison(device, 16 if quick else 64, 1)
            result["bf16_conv_layer"] = layer
            slowdown = layer["fp32"]["seconds"] / layer["bf16_autocast"]["seconds"]
            figures.append(figure(f"bf16 autocast, {layer['layer']}, forward + backward",
                                  layer["bf16_autocast"]["passes_per_second"], "passes/s", "the same layer in fp32",
                                  layer["fp32"]["passes_per_second"], "higher",
                                  f"CPU capability {torch.backends.cpu.get_cpu_capability()}"))
            figures.append(figure("bf16 matmul FLOP/s (timed torch.mm)", peak["bf16"], "FLOP/s",
                                  "fp32 matmul peak", peak["fp32"], "higher"))
            if slowdown >= 0.5:
                bf16 = run_training(pairs, device, batch, steps, frames, bf16=True, warmup=warmup, count_flops=False)
                result["bf16_autocast"] = bf16
                figures.append(figure(f"bf16 autocast training, batch {batch}", bf16["samples_per_second"],
                                      "samples/s", "fp32 training", fp32["samples_per_second"], "higher"))
            else:
                estimate = fp32["mean_compute_seconds"] / slowdown
                result["skipped"].append({
                    "name": "bf16 autocast whole training step",
                    "reason": f"bf16 autocast runs {1 / slowdown:.1f}x slower than fp32 on this CPU's largest conv "
                              f"(no native bf16: {torch.backends.cpu.get_cpu_capability()}); one step at batch "
                              f"{batch} would take about {estimate:.0f} s"})
    result["figures"] = figures
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--frames", type=int)
    args = parser.parse_args()
    result = measure(args.quick, args.batch, args.steps, args.frames)
    for fig in result["figures"]:
        print(f"{fig['name']}: {fig['value']:.4g} {fig['unit']} vs {fig['baseline']} {fig['baseline_value']:.4g} "
              f"(ratio {fig['ratio']:.3f})")
    print(json.dumps(result["skipped"], indent=1))


if __name__ == "__main__":
    main()
