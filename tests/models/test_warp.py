"""Polyharmonic-spline sparse image warp against exact expectations and independent code.

The references are scipy's ``RBFInterpolator`` (same kernels with a degree-1 polynomial) for
the spline and ``scipy.ndimage.map_coordinates(order=1)`` for the bilinear resampling, plus
hand-built shifted images for the pixel conventions and ``torch.autograd.gradcheck`` for the
gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.interpolate import RBFInterpolator
from scipy.ndimage import map_coordinates

from speech2face.models import warp
from speech2face.models.warp import (boundary_points, dense_image_warp, interpolate_spline, pixel_grid,
                              polyharmonic_spline_eval, polyharmonic_spline_fit, sparse_image_warp)

SCIPY_KERNEL = {1: "linear", 2: "thin_plate_spline", 3: "cubic"}


def random_points(generator: torch.Generator, batch: int, count: int, height: int, width: int,
                  margin: float = 2.0, dtype=torch.float64) -> torch.Tensor:
    """(batch, count, 2) (x, y) uniformly inside the image, ``margin`` pixels from the border."""
    unit = torch.rand(batch, count, 2, generator=generator, dtype=dtype)
    size = torch.tensor([width - 1 - 2 * margin, height - 1 - 2 * margin], dtype=dtype)
    return margin + unit * size


def distinct_interior_pixels(generator: torch.Generator, batch: int, count: int, height: int,
                             width: int, margin: int = 2) -> torch.Tensor:
    """(batch, count, 2) distinct integer (x, y) pixels at least ``margin`` from the border."""
    inner_w, inner_h = width - 2 * margin, height - 2 * margin
    rows = []
    for _ in range(batch):
        flat = torch.randperm(inner_w * inner_h, generator=generator)[:count]
        rows.append(torch.stack([flat % inner_w + margin, flat // inner_w + margin], dim=-1))
    return torch.stack(rows).double()


def scipy_boundary_points(height: int, width: int) -> np.ndarray:
    """num_boundary_points=2 written out by hand: the 4 corners and the 4 edge midpoints."""
    w, h = width - 1, height - 1
    return np.array([[0, 0], [w / 2, 0], [w, 0], [0, h / 2], [w, h / 2], [0, h], [w / 2, h], [w, h]],
                    dtype=np.float64)


# --- boundary points and conventions ------------------------------------------------------


def test_boundary_points_follow_tf_layout() -> None:
    assert len(boundary_points(9, 13, 0)) == 0
    corners = {tuple(p) for p in boundary_points(9, 13, 1).tolist()}
    assert corners == {(0.0, 0.0), (12.0, 0.0), (0.0, 8.0), (12.0, 8.0)}
    two = {tuple(p) for p in boundary_points(9, 13, 2, torch.float64).tolist()}
    assert two == {tuple(p) for p in scipy_boundary_points(9, 13).tolist()}
    three = boundary_points(49, 64, 3)
    assert len(three) == 12 and len({tuple(p) for p in three.tolist()}) == 12
    on_x_edge = (three[:, 0] == 0) | (three[:, 0] == 63)
    on_y_edge = (three[:, 1] == 0) | (three[:, 1] == 48)
    assert bool((on_x_edge | on_y_edge).all())
    assert sorted(three[three[:, 1] == 0, 0].tolist()) == [0.0, 21.0, 42.0, 63.0]


def test_dense_image_warp_subtracts_flow_x_then_y() -> None:
    image = torch.arange(5 * 7, dtype=torch.float64).reshape(1, 1, 5, 7)
    flow = torch.zeros(1, 5, 7, 2, dtype=torch.float64)
    flow[..., 0] = 2.0    # x
    flow[..., 1] = -1.0   # y
    out = dense_image_warp(image, flow)
    # output[y, x] = image[y + 1, x - 2] inside; border padding repeats the edge outside
    torch.testing.assert_close(out[0, 0, :4, 2:], image[0, 0, 1:, :5], atol=1e-12, rtol=0)
    torch.testing.assert_close(out[0, 0, :4, 0], image[0, 0, 1:, 0], atol=1e-12, rtol=0)
    torch.testing.assert_close(out[0, 0, 4, 2:], image[0, 0, 4, :5], atol=1e-12, rtol=0)
    # a half-pixel flow averages neighbours (bilinear)
    flow = torch.zeros(1, 5, 7, 2, dtype=torch.float64)
    flow[..., 0] = 0.5
    out = dense_image_warp(image, flow)
    torch.testing.assert_close(out[0, 0, :, 1:], 0.5 * (image[0, 0, :, 1:] + image[0, 0, :, :-1]),
                               atol=1e-12, rtol=0)


# --- 1. identity ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_boundary_points", [0, 2])
def test_zero_displacement_returns_the_image(num_boundary_points: int) -> None:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 16, 12, generator=generator)
    points = random_points(generator, 2, 7, 16, 12, dtype=torch.float32)
    warped, flow = sparse_image_warp(images, points, points.clone(), num_boundary_points=num_boundary_points)
    assert warped.shape == images.shape and flow.shape == (2, 16, 12, 2)
    assert flow.abs().max().item() < 1e-5
    torch.testing.assert_close(warped, images, atol=1e-5, rtol=0)


# --- 2. uniform shifts ---------------------------------------------------------------------


@pytest.mark.parametrize("shift", [(3, -2), (-1, 4), (0, 1)])
def test_uniform_shift_without_boundary_moves_the_image(shift: tuple[int, int]) -> None:
    dx, dy = shift
    height, width = 20, 24
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, height, width, generator=generator)
    source = random_points(generator, 2, 6, height, width, dtype=torch.float32)
    dest = source + torch.tensor([dx, dy], dtype=torch.float32)
    warped, flow = sparse_image_warp(images, source, dest, num_boundary_points=0)
    # a constant displacement is reproduced exactly by the affine part of the spline
    torch.testing.assert_close(flow, torch.tensor([dx, dy], dtype=torch.float32).expand_as(flow),
                               atol=1e-4, rtol=0)
    # output[y, x] = image[y - dy, x - dx] wherever that source pixel exists
    out_y = slice(max(dy, 0), height + min(dy, 0))
    out_x = slice(max(dx, 0), width + min(dx, 0))
    in_y = slice(max(-dy, 0), height + min(-dy, 0))
    in_x = slice(max(-dx, 0), width + min(-dx, 0))
    torch.testing.assert_close(warped[:, :, out_y, out_x], images[:, :, in_y, in_x], atol=1e-4, rtol=0)
    rolled = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
    torch.testing.assert_close(warped[:, :, out_y, out_x], rolled[:, :, out_y, out_x], atol=1e-4, rtol=0)


def test_uniform_shift_with_boundary_points_holds_at_the_control_points() -> None:
    height = width = 65        # 64 / 2: the edge midpoints are pixel centres
    dx, dy = 2, -3
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(1, 2, height, width, generator=generator)
    # a cluster of integer control points well inside the image
    source = distinct_interior_pixels(generator, 1, 9, 16, 16).float() + 24
    dest = source + torch.tensor([dx, dy], dtype=torch.float32)
    warped, flow = sparse_image_warp(images, source, dest, num_boundary_points=2)
    xs, ys = dest[0, :, 0].long(), dest[0, :, 1].long()
    torch.testing.assert_close(flow[0, ys, xs], torch.tensor([dx, dy], dtype=torch.float32).expand(9, 2),
                               atol=1e-3, rtol=0)
    # dest pixel shows the source pixel's content
    torch.testing.assert_close(warped[0][:, ys, xs], images[0][:, ys - dy, xs - dx], atol=1e-3, rtol=0)
    # within a pixel of each control point the displacement stays close to the shift (it relaxes
    # towards 0 further out); at the pinned border it is 0
    for x, y in dest[0].long().tolist():
        around = flow[0, y - 1:y + 2, x - 1:x + 2]
        assert (around - torch.tensor([dx, dy], dtype=torch.float32)).abs().max().item() < 0.15
    border = boundary_points(height, width, 2).long()
    assert flow[0, border[:, 1], border[:, 0]].abs().max().item() < 1e-3


# --- 3. interpolation conditions of the dense flow -----------------------------------------


@pytest.mark.parametrize("height,width,count,num_boundary", [(49, 64, 10, 3), (225, 225, 68, 2)])
def test_dense_flow_interpolates_the_displacements_float32(height: int, width: int, count: int,
                                                            num_boundary: int) -> None:
    generator = torch.Generator().manual_seed(4)
    dest = distinct_interior_pixels(generator, 2, count, height, width, margin=8).float()
    # a smooth displacement field (up to ~3 px) plus sub-pixel jitter, like landmarks of a face
    # against the mean face; landmark-like spacing (2 px) with independent random 3 px moves
    # would fold the image and amplify float32 rounding towards 1e-3 px
    phase = torch.rand(2, 1, 2, generator=generator) * 6.28
    smooth = 2.5 * torch.sin(dest.flip(-1) / 40 + phase)
    displacement = smooth + 0.5 * (torch.rand(2, count, 2, generator=generator) - 0.5)
    source = dest - displacement
    images = torch.rand(2, 1, height, width, generator=generator)
    warped, flow = sparse_image_warp(images, source, dest, num_boundary_points=num_boundary)
    for b in range(2):
        xs, ys = dest[b, :, 0].long(), dest[b, :, 1].long()
        torch.testing.assert_close(flow[b, ys, xs], displacement[b], atol=1e-3, rtol=0)
        # so pixel dest_i shows the (bilinearly sampled) content at source_i
        at_source = map_coordinates(images[b, 0].numpy().astype(np.float64),
                                    [source[b, :, 1].numpy(), source[b, :, 0].numpy()], order=1)
        np.testing.assert_allclose(warped[b, 0, ys, xs].numpy(), at_source, atol=2e-3)
    border = boundary_points(height, width, num_boundary)
    assert bool((border == border.round()).all())   # sizes chosen so they are pixel centres
    border = border.long()
    assert flow[:, border[:, 1], border[:, 0]].abs().max().item() < 1e-3


# --- 4. parity of the spline with scipy ----------------------------------------------------


@pytest.mark.parametrize("order", [1, 2, 3])
def test_interpolate_spline_matches_scipy(order: int) -> None:
    rng = np.random.default_rng(5)
    train = rng.uniform(0, 200, size=(2, 12, 2))
    values = rng.normal(size=(2, 12, 3))
    query = rng.uniform(-20, 220, size=(2, 50, 2))
    ours = interpolate_spline(torch.from_numpy(train), torch.from_numpy(values), torch.from_numpy(query),
                              order=order).numpy()
    # the raw fit/eval in the original coordinates (no normalisation) is the same function
    weights, affine = polyharmonic_spline_fit(torch.from_numpy(train), torch.from_numpy(values), order)
    raw = polyharmonic_spline_eval(torch.from_numpy(query), torch.from_numpy(train), weights, affine,
                                   order).numpy()
    for b in range(2):
        reference = RBFInterpolator(train[b], values[b], kernel=SCIPY_KERNEL[order], degree=1,
                                    smoothing=0.0)(query[b])
        scale = np.abs(reference).max()
        assert np.abs(ours[b] - reference).max() <= 1e-4 * scale
        assert np.abs(raw[b] - reference).max() <= 1e-4 * scale
        # and it interpolates: the training values come back at the training points
        back = interpolate_spline(torch.from_numpy(train[b:b + 1]), torch.from_numpy(values[b:b + 1]),
                                  torch.from_numpy(train[b:b + 1]), order=order)[0].numpy()
        np.testing.assert_allclose(back, values[b], atol=1e-8)


@pytest.mark.parametrize("order,regularization", [(2, 10.0), (2, 1000.0), (3, 1e4)])
def test_regularization_matches_scipy_smoothing(order: int, regularization: float) -> None:
    # scipy adds `smoothing` to the kernel diagonal with the same kernel sign for r^2 log r and
    # r^3, in the caller's units: this checks the reg / s^order rescaling of the normalisation
    rng = np.random.default_rng(6)
    train = rng.uniform(0, 200, size=(1, 15, 2))
    values = rng.normal(size=(1, 15, 2))
    query = rng.uniform(0, 200, size=(1, 40, 2))
    ours = interpolate_spline(torch.from_numpy(train), torch.from_numpy(values), torch.from_numpy(query),
                              order=order, regularization=regularization)[0].numpy()
    reference = RBFInterpolator(train[0], values[0], kernel=SCIPY_KERNEL[order], degree=1,
                                smoothing=regularization)(query[0])
    unregularized = RBFInterpolator(train[0], values[0], kernel=SCIPY_KERNEL[order], degree=1)(query[0])
    assert np.abs(reference - unregularized).max() > 5e-2          # the smoothing matters here
    assert np.abs(ours - reference).max() <= 1e-4 * np.abs(reference).max()


# --- 5. gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_boundary_points", [0, 2])
def test_sparse_image_warp_gradcheck(num_boundary_points: int) -> None:
    generator = torch.Generator().manual_seed(7)
    image = torch.rand(1, 1, 8, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    source = random_points(generator, 1, 4, 8, 8, margin=1.5).requires_grad_(True)
    dest = (source.detach() + 0.8 * torch.rand(1, 4, 2, generator=generator, dtype=torch.float64) - 0.4
            ).requires_grad_(True)

    def warp_both(image, source, dest):
        return sparse_image_warp(image, source, dest, num_boundary_points=num_boundary_points)

    # the full Jacobian for the default layout; random projections (fast mode) without the
    # border points keep the file quick
    assert torch.autograd.gradcheck(warp_both, (image, source, dest), eps=1e-6, atol=1e-6, rtol=1e-4,
                                    fast_mode=num_boundary_points == 0)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_interpolate_spline_gradcheck(order: int) -> None:
    generator = torch.Generator().manual_seed(8)
    train = random_points(generator, 2, 6, 10, 10).requires_grad_(True)
    values = torch.randn(2, 6, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    query = random_points(generator, 1, 5, 10, 10).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t, v, q: interpolate_spline(t, v, q, order=order, regularization=0.1),
                                    (train, values, query), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_gradient_is_finite_at_coincident_points(order: int) -> None:
    # queries exactly on the control points put r = 0 in the evaluation too, not only on the
    # diagonal of the fit: the backward pass must not produce NaN there
    generator = torch.Generator().manual_seed(9)
    train = random_points(generator, 1, 6, 10, 10).requires_grad_(True)
    values = torch.randn(1, 6, 1, generator=generator, dtype=torch.float64, requires_grad=True)
    out = interpolate_spline(train, values, train, order=order)
    torch.testing.assert_close(out, values, atol=1e-8, rtol=0)
    (out.square().sum() + out.sum()).backward()
    assert torch.isfinite(train.grad).all() and torch.isfinite(values.grad).all()
    # interpolation at the control points reproduces the values whatever the points: d out / d
    # values is the identity there, and d out / d train is 0 (up to rounding)
    torch.testing.assert_close(values.grad, 2 * values.detach() + 1, atol=1e-6, rtol=0)
    assert train.grad.abs().max().item() < 1e-6


def test_chunked_checkpointed_evaluation_equals_single_block(monkeypatch: pytest.MonkeyPatch) -> None:
    # a 224 x 224 batch takes the chunked, checkpointed path; small tests would not, so force it
    generator = torch.Generator().manual_seed(10)
    image = torch.rand(2, 2, 12, 10, generator=generator, dtype=torch.float64, requires_grad=True)
    source = random_points(generator, 2, 5, 12, 10).requires_grad_(True)
    dest = (source.detach() + torch.rand(2, 5, 2, generator=generator, dtype=torch.float64) - 0.5
            ).requires_grad_(True)

    def run():
        warped, flow = sparse_image_warp(image, source, dest)
        grads = torch.autograd.grad((warped * torch.linspace(0, 1, 10, dtype=torch.float64)).sum()
                                    + flow.square().sum(), (image, source, dest))
        return warped.detach(), flow.detach(), grads

    single = run()
    monkeypatch.setattr(warp, "_KERNEL_CHUNK_ELEMENTS", 2 * 13 * 7)   # 7 queries per chunk
    chunked = run()
    torch.testing.assert_close(chunked[0], single[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(chunked[1], single[1], atol=1e-12, rtol=0)
    for a, b in zip(chunked[2], single[2]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    # fast mode (random projections): the full Jacobian would take one backward per pixel,
    # each re-running every checkpointed chunk
    assert torch.autograd.gradcheck(lambda d: sparse_image_warp(image.detach(), source.detach(), d)[0],
                                    (dest,), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


# --- 6. the whole warp against scipy ---------------------------------------------------------


def test_sparse_image_warp_matches_scipy_pipeline() -> None:
    height, width = 41, 53
    rng = np.random.default_rng(11)
    images = rng.uniform(size=(2, 3, height, width))
    source = rng.uniform(6, [width - 7, height - 7], size=(2, 9, 2))
    displacement = rng.uniform(-4, 4, size=(2, 9, 2)) * np.array([1.0, 0.5])   # asymmetric in x, y
    dest = source + displacement
    warped, flow = sparse_image_warp(torch.from_numpy(images), torch.from_numpy(source),
                                     torch.from_numpy(dest), num_boundary_points=2)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    grid = np.stack([xs.ravel(), ys.ravel()], axis=-1)
    border = scipy_boundary_points(height, width)
    for b in range(2):
        control = np.concatenate([dest[b], border])
        values = np.concatenate([displacement[b], np.zeros_like(border)])
        ref_flow = RBFInterpolator(control, values, kernel="thin_plate_spline", degree=1)(grid)
        ref_flow = ref_flow.reshape(height, width, 2)
        np.testing.assert_allclose(flow[b].numpy(), ref_flow, atol=1e-8)
        coords = [ys - ref_flow[..., 1], xs - ref_flow[..., 0]]             # (row, col) = (y, x)
        for c in range(3):
            reference = map_coordinates(images[b, c], coords, order=1, mode="nearest")
            np.testing.assert_allclose(warped[b, c].numpy(), reference, atol=1e-4)
    assert np.abs(flow.numpy()).max() > 1.0     # a real warp, not a near-identity


def test_pixel_grid_is_x_then_y() -> None:
    grid = pixel_grid(3, 4)
    assert grid.shape == (3, 4, 2)
    assert grid[2, 1].tolist() == [1.0, 2.0]


def test_non_finite_control_points_raise_instead_of_crashing() -> None:
    # grid_sample's CPU backward segfaults on NaN positions: the warp must refuse them
    image = torch.rand(1, 1, 8, 8, requires_grad=True)
    source = torch.tensor([[[2.0, 2.0], [5.0, 2.5], [3.0, 5.5], [5.5, 5.0]]])
    dest = source.clone()
    dest[0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        sparse_image_warp(image, source, dest)
    # a landmark exactly on a boundary point (the corner) with a different displacement has
    # no interpolant: the solve says so; regularization turns it into a smoothing fit
    dest = source.clone()
    dest[0, 0] = torch.tensor([0.0, 0.0])
    with pytest.raises(torch.linalg.LinAlgError):
        sparse_image_warp(image, source, dest)
    _, flow = sparse_image_warp(image, source, dest, regularization=1e-3)
    assert torch.isfinite(flow).all()


# --- coarse flow (flow_grid) ---------------------------------------------------------------


def test_coarse_flow_grid_stays_close_to_the_exact_flow() -> None:
    """The decoder evaluates the spline on a 57 x 57 grid and resamples it. On real warps
    (tests/fixtures/face_landmarks.npy: the sample corpus's mean landmarks and four faces'
    landmarks, 224 x 224 crop pixels) the coarse flow stays within half a pixel of the exact
    flow next to the landmarks and a hundredth of a pixel on average."""
    from pathlib import Path

    stored = torch.from_numpy(np.load(Path(__file__).resolve().parents[1] / "fixtures" / "face_landmarks.npy"))
    mean, faces = stored[0], stored[1:]
    source = mean.expand_as(faces).clone()
    images = torch.rand(len(faces), 3, 224, 224, generator=torch.Generator().manual_seed(11))
    exact, exact_flow = sparse_image_warp(images, source, faces)
    coarse, coarse_flow = sparse_image_warp(images, source, faces, flow_grid=57)
    assert exact_flow.abs().max() > 2.0                      # a real warp, not a no-op
    error = (coarse_flow - exact_flow).abs()
    assert error.max().item() < 0.5 and error.mean().item() < 0.01
    assert (coarse - exact).abs().mean().item() < 5e-3       # on noise images, the worst case
    with pytest.raises(ValueError, match="flow_grid"):
        sparse_image_warp(images, source, faces, flow_grid=1)
