"""keep_freed_memory: the C library takes the settings, and training gives the same weights
with it as without (each in its own process: mallopt lasts for the process)."""

from __future__ import annotations

import hashlib
import subprocess
import sys

TRAIN_A_FEW_STEPS = """
import hashlib, io, sys, torch
from speech2face.core.allocator import keep_freed_memory
from speech2face.models.voice_encoder import VoiceEncoder
if sys.argv[1] == "kept":
    assert keep_freed_memory()
torch.set_num_threads(2)
torch.manual_seed(0)
model = VoiceEncoder(out_dim=16, width=0.125, input_mode="magnitude").to(memory_format=torch.channels_last)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(3):   # activations of ~20 MB, freed and allocated again each step
    x = torch.randn(4, 598, 257, 2)
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()
buffer = io.BytesIO()
for name, tensor in model.state_dict().items():
    buffer.write(name.encode()); buffer.write(tensor.contiguous().numpy().tobytes())
print(hashlib.sha256(buffer.getvalue()).hexdigest())
"""


def _weights_digest(mode: str) -> str:
    done = subprocess.run([sys.executable, "-c", TRAIN_A_FEW_STEPS, mode], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_kept_heap_gives_the_same_weights() -> None:
    default, kept = _weights_digest("default"), _weights_digest("kept")
    assert len(default) == 64 and default == kept
    assert hashlib.sha256(b"").hexdigest() != default
