"""Voice encoder of Speech2Face (Oh et al. 2019, Table 1), in torch.

Input: complex spectrogram as (batch, time, freq, 2) — 598 x 257 x 2 for 6 s — the layout
the spectrogram stage writes; it is moved to channels-first (batch, 2, time, freq) inside.

Convolutions are 4x4 and unpadded ("valid", as in the reference Keras model). Max-pooling
is 2x1: along time only, the frequency axis is never pooled. The average pool runs over all
of time, so any clip length works; the frequency axis that remains (57 bins for 257 input
frequencies) is flattened into the first fully connected layer, which is why the model has
~148 M parameters at full width.
"""

from __future__ import annotations

import torch
from torch import nn

# (out channels, stride) per conv; "pool" = 2x1 max-pool along time.
TABLE_1 = [(64, 1), (64, 1), (128, 1), "pool", (128, 1), "pool", (128, 1), "pool",
           (256, 1), "pool", (512, 1), (512, 2), (512, 2)]
HIDDEN = 4096
# "complex": the paper's input, compressed real and imaginary parts as two channels;
# "magnitude": one channel, sqrt(re^2 + im^2) of the same compressed parts.
INPUT_MODES = ("complex", "magnitude")


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def frequency_bins_after_convs(n_freq: int) -> int:
    """Frequency size left after Table 1's convs (pools do not touch it)."""
    for layer in TABLE_1:
        if layer != "pool":
            _, stride = layer
            n_freq = (n_freq - 4) // stride + 1
    return n_freq


class VoiceEncoder(nn.Module):
    def __init__(self, out_dim: int = 4096, width: float = 1.0, n_freq: int = 257, input_mode: str = "complex"):
        super().__init__()
        if input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode {input_mode!r}: expected one of {INPUT_MODES}")
        self.input_mode = input_mode
        layers: list[nn.Module] = []
        channels = 2 if input_mode == "complex" else 1
        for index, layer in enumerate(TABLE_1):
            if layer == "pool":
                layers.append(nn.MaxPool2d(kernel_size=(2, 1), stride=(2, 1)))
                continue
            out_channels, stride = layer
            out_channels = scaled(out_channels, width)
            layers.append(nn.Conv2d(channels, out_channels, kernel_size=4, stride=stride))
            if index < len(TABLE_1) - 1:  # Table 1: the last conv goes straight into the average pool
                layers += [nn.ReLU(inplace=True), nn.BatchNorm2d(out_channels)]
            channels = out_channels
        self.convs = nn.Sequential(*layers)
        self.post_pool = nn.Sequential(nn.ReLU(inplace=True), nn.BatchNorm2d(channels))
        remaining_freq = frequency_bins_after_convs(n_freq)
        if remaining_freq < 1:
            raise ValueError(f"{n_freq} frequency bins are too few for Table 1's convolutions")
        hidden = scaled(HIDDEN, width)
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * remaining_freq, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim),
        )
        self.out_dim = out_dim
        self.n_freq = n_freq

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        x = spectrogram.permute(0, 3, 1, 2)            # (B, 2, time, freq)
        if self.input_mode == "magnitude":
            # phase-free view of the same spectrogram: with little data the network cannot
            # learn to discard phase from real/imaginary parts on its own
            x = x.pow(2).sum(dim=1, keepdim=True).sqrt()
        x = self.convs(x)                              # (B, C, time', freq')
        x = x.mean(dim=2, keepdim=True)                # average over all of time
        x = self.post_pool(x)
        return self.fc(x)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters + buffers such as batch-norm statistics)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() for name, b in model.named_buffers() if not name.endswith("num_batches_tracked"))
    return trainable, sum(p.numel() for p in model.parameters()) + buffers
