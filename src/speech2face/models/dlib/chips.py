"""``extract_face_chips``: a differentiable, batched equivalent of ``dlib.get_face_chip``
(150 x 150 chips aligned on 68 landmarks, sampled as dlib samples them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CHIP_SIZE = 150


# dlib's mean face shape (get_face_chip_details in dlib/image_transforms/interpolation.h):
# points 17..67 of the 68-point layout in [0, 1] chip coordinates. dlib fits the chip to
# the points below only (it ignores the jaw, the eyebrows and the lower lip); these numbers
# and that selection reproduce dlib.get_face_chip_details to 1e-13 px (checked by the
# tests, and by moving each landmark in turn: only these 33 change the chip).
_MEAN_FACE_X = np.array([
    0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124,
    0.904991, 0.98004, 0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036,
    0.490127, 0.554217, 0.613373, 0.121737, 0.187122, 0.265825, 0.334606, 0.260918,
    0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335, 0.254149,
    0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
    0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874,
    0.553364, 0.490127, 0.42689])
_MEAN_FACE_Y = np.array([
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891,
    0.0187482, 0.038915, 0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326,
    0.609345, 0.628106, 0.609345, 0.587326, 0.216423, 0.178758, 0.179852, 0.231733,
    0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077, 0.245099,
    0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
    0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746,
    0.784792, 0.824182, 0.831803, 0.824182])
CHIP_LANDMARKS = np.array([i for i in range(27, 68) if not (55 <= i <= 59 or 65 <= i <= 67)])

# pyramid_down<2>: 5-tap binomial filter, stride 2, valid; level pixel i sits at input
# pixel 2 i + 2, but dlib maps points with p/2 - (1.25, 0.75) (x, y), and so do we.
_PYRAMID_TAPS = (1.0, 4.0, 6.0, 4.0, 1.0)
_PYRAMID_SHIFT = (1.25, 0.75)


@dataclass
class ChipDetails:
    """dlib's chip_details of a batch: the chip's rect (centre, width) and angle.

    centre: (B, 2) image (x, y); width: (B,) the rect's width (dlib's right - left + 1);
    angle: (B,) radians. Chip pixel (c, r) samples the image at centre + R(angle) *
    k * ((c, r) - (size - 1) / 2) with k = (width - 1) / (size - 1).
    """

    centre: torch.Tensor
    width: torch.Tensor
    angle: torch.Tensor
    size: int


def face_chip_details(landmarks: torch.Tensor, size: int = CHIP_SIZE, padding: float = 0.25) -> ChipDetails:
    """dlib.get_face_chip_details for (B, 68, 2) landmarks (x, y), differentiably.

    The similarity transform from the padded mean face (in chip pixels) to the landmarks is
    the closed-form least-squares fit (dlib's find_similarity_transform gives the same).
    """
    dtype = torch.float64
    points = landmarks.to(dtype)[:, CHIP_LANDMARKS]                        # (B, 33, 2)
    mean_face = np.stack([_MEAN_FACE_X, _MEAN_FACE_Y], 1)[CHIP_LANDMARKS - 17]
    source = torch.as_tensor((padding + mean_face) / (2 * padding + 1) * size, dtype=dtype,
                             device=landmarks.device)                     # (33, 2)
    source_mean = source.mean(0)
    source_centred = source - source_mean
    target_mean = points.mean(1, keepdim=True)
    target_centred = points - target_mean
    norm = (source_centred ** 2).sum()
    # target ~ [[a, -b], [b, a]] source + t
    a = (source_centred * target_centred).sum((1, 2)) / norm
    b = (source_centred[:, 0] * target_centred[..., 1] - source_centred[:, 1] * target_centred[..., 0]).sum(1) / norm
    rotation = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)   # (B, 2, 2)
    translation = target_mean[:, 0] - rotation @ source_mean
    # chip_details(from, to, dims): rect centred on the transform of the chip's centre
    # (size / 2, not (size - 1) / 2), width size * scale.
    chip_centre = torch.full((2,), size / 2.0, dtype=dtype, device=landmarks.device)
    centre = rotation @ chip_centre + translation
    return ChipDetails(centre, size * torch.hypot(a, b), torch.atan2(b, a), size)


def _chip_sample_points(details: ChipDetails, centre: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """(B, size, size, 2) (x, y) points sampled by chip pixels, for a centre and pixel step."""
    size = details.size
    offsets = torch.arange(size, dtype=centre.dtype, device=centre.device) - (size - 1) / 2.0
    rows, cols = torch.meshgrid(offsets, offsets, indexing="ij")
    cos, sin = torch.cos(details.angle), torch.sin(details.angle)
    u = step.view(-1, 1, 1) * cols
    v = step.view(-1, 1, 1) * rows
    x = centre[:, 0, None, None] + cos.view(-1, 1, 1) * u - sin.view(-1, 1, 1) * v
    y = centre[:, 1, None, None] + sin.view(-1, 1, 1) * u + cos.view(-1, 1, 1) * v
    return torch.stack([x, y], -1)


def face_chip_grid(landmarks: torch.Tensor, image_size: tuple[int, int], size: int = CHIP_SIZE,
                   padding: float = 0.25) -> torch.Tensor:
    """grid_sample grid (B, size, size, 2) (align_corners=True) of dlib's face chip.

    Direct bilinear sampling of the full-resolution image, which is what dlib does while
    the chip's rect is under about twice the chip size (faces up to ~300 px across for a
    150 px chip); ``extract_face_chips`` adds dlib's pyramid for larger faces.
    """
    details = face_chip_details(landmarks, size, padding)
    points = _chip_sample_points(details, details.centre, (details.width - 1) / (size - 1))
    height, width = image_size
    scale = points.new_tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)])
    return points * scale - 1.0


def _sample_like_dlib(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling of (B, C, H, W) at (B, h, w, 2) pixel points, dlib's way.

    dlib's interpolate_bilinear leaves a chip pixel black when any of its four neighbours
    lies outside the image (grid_sample would blend in zeros), hence the mask.
    """
    height, width = image.shape[-2:]
    scale = points.new_tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)])
    grid = (points * scale - 1.0).to(image.dtype)
    sampled = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    corner = torch.floor(points.detach())
    inside = ((corner[..., 0] >= 0) & (corner[..., 1] >= 0)
              & (corner[..., 0] + 1 < width) & (corner[..., 1] + 1 < height))
    return sampled * inside.unsqueeze(1).to(image.dtype)


def _floor_straight_through(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.floor(x) - x).detach()


def pyramid_down(image: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """dlib's pyramid_down<2> of (B, C, H, W): [1 4 6 4 1]/16 both ways, stride 2, valid.

    dlib computes it in integers for uint8 RGB images and truncates; ``quantize`` does the
    same in the forward pass and lets gradients through unchanged (straight-through).
    """
    channels = image.shape[1]
    taps = image.new_tensor(_PYRAMID_TAPS) / 16.0
    out = F.conv2d(image, taps.view(1, 1, 1, 5).expand(channels, 1, 1, 5).contiguous(),
                   stride=(1, 2), groups=channels)
    out = F.conv2d(out, taps.view(1, 1, 5, 1).expand(channels, 1, 5, 1).contiguous(),
                   stride=(2, 1), groups=channels)
    return _floor_straight_through(out) if quantize else out


def _pyramid_levels_needed(width: float, size: int) -> int:
    """How many times dlib halves the image first: rect_down until its area <= size^2."""
    levels = 0
    side = width  # rect side (right - left + 1); rect_down halves right - left
    while (side - 1) / 2 + 1 > size and levels < 30:
        side = (side - 1) / 2 + 1
        levels += 1
    return levels


def extract_face_chips(images: torch.Tensor, landmarks: torch.Tensor, size: int = CHIP_SIZE,
                       padding: float = 0.25, quantize: bool = False) -> torch.Tensor:
    """Differentiable dlib.get_face_chip: (B, C, H, W) float, (B, 68, 2) -> (B, C, size, size).

    Landmarks are pixel (x, y) with pixel centres at integer coordinates (dlib's); dlib's
    full_object_detection stores them as integers, so pass rounded ones to match dlib
    exactly. Gradients flow to the image and to the landmarks.

    Faces whose chip rect is more than about twice the chip size are first downsampled with
    dlib's pyramid_down<2>, applied to dlib's crop of the image (the rect's rotated corners
    grown by 2, 6, 14... px: the crop's position decides which pixels the pyramid keeps),
    as dlib's extract_image_chips does. For a uint8 image dlib truncates the pyramid levels
    and the chip to integers: ``quantize=True`` does the same in the forward pass
    (straight-through gradients), which makes the chip equal to dlib.get_face_chip's; by
    default the chip is left smooth (within 1 grey level of dlib's, 0.5 on average).
    """
    if images.dim() != 4 or landmarks.shape[1:] != (68, 2) or images.shape[0] != landmarks.shape[0]:
        raise ValueError(f"expected images (B, C, H, W) and landmarks (B, 68, 2), got "
                         f"{tuple(images.shape)} and {tuple(landmarks.shape)}")
    details = face_chip_details(landmarks, size, padding)
    step = (details.width - 1) / (size - 1)
    height, width = images.shape[-2:]
    widths = details.width.detach().cpu().numpy()
    levels = [_pyramid_levels_needed(float(w), size) for w in widths]
    chips: list[torch.Tensor | None] = [None] * images.shape[0]
    direct = [i for i, n in enumerate(levels) if n == 0]
    if direct:
        index = torch.as_tensor(direct, device=images.device)
        sub = ChipDetails(details.centre[index], details.width[index], details.angle[index], size)
        points = _chip_sample_points(sub, sub.centre, step[index])
        sampled = _sample_like_dlib(images[index], points)
        for row, i in enumerate(direct):
            chips[i] = sampled[row]
    for i, n in enumerate(levels):
        if n == 0:
            continue
        # dlib's crop: the rect's rotated corners, grown by 2, 6, 14, ... px, in the image.
        centre = details.centre[i].detach().cpu().numpy()
        angle = float(details.angle[i])
        half = (float(widths[i]) - 1) / 2
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        corners = centre + np.array([[-half, -half], [half, -half], [-half, half], [half, half]]) @ rotation.T
        grow = 2.0
        for _ in range(n):
            grow = grow * 2 + 2
        left, top = np.maximum(corners.min(0) - grow, 0)
        right, bottom = np.minimum(corners.max(0) + grow, [width - 1, height - 1])
        left, top, right, bottom = (int(np.floor(v + 0.5)) for v in (left, top, right, bottom))
        level = images[i:i + 1, :, top:bottom + 1, left:right + 1]
        level_centre = details.centre[i:i + 1] - details.centre.new_tensor([left, top])
        shift = details.centre.new_tensor(_PYRAMID_SHIFT)
        for _ in range(n):
            level = pyramid_down(level, quantize)
            level_centre = level_centre / 2 - shift
        sub = ChipDetails(level_centre, details.width[i:i + 1], details.angle[i:i + 1], size)
        points = _chip_sample_points(sub, level_centre, step[i:i + 1] / 2 ** n)
        chips[i] = _sample_like_dlib(level, points)[0]
    result = torch.stack(chips)
    return _floor_straight_through(result) if quantize else result
