"""Pictures every part draws: rows of face images in one PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from speech2face.core.fsutil import atomic_path


def face_grid(rows: list[np.ndarray], path: Path, labels: list[str] | None = None) -> None:
    """Rows of equal-size uint8 face images -> one PNG (no axes; a label column if given)."""
    from PIL import Image, ImageDraw

    tiles = [np.concatenate(list(row), axis=1) for row in rows]
    grid = np.concatenate(tiles, axis=0)
    image = Image.fromarray(grid)
    if labels:
        draw = ImageDraw.Draw(image)
        width = grid.shape[1] // len(rows[0])
        for c, label in enumerate(labels):
            draw.text((c * width + 4, 4), label, fill=(255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
