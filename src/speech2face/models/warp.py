"""Differentiable, batched sparse image warp with a polyharmonic spline (torch).

The torch counterpart of TensorFlow Addons' ``tfa.image.sparse_image_warp`` /
``interpolate_spline`` / ``dense_image_warp``, used by the face decoder of Cole et al. (2017):
the decoder paints a texture registered to the mean face geometry and warps it so that the
mean landmarks land on the predicted landmarks. Gradients reach both the image (through
bilinear sampling) and the control points (through the spline solve and the sampling
positions).

Conventions (they differ from TensorFlow's in the axis order only):

* Images are ``(B, C, H, W)`` (torch layout, TF uses ``(B, H, W, C)``).
* Points are ``(x, y)`` in pixels, x to the right, y down, pixel centres at integer
  coordinates: the top-left pixel is (0, 0), the bottom-right (W-1, H-1). TF uses (y, x).
* A flow ``(B, H, W, 2)`` holds ``(flow_x, flow_y)`` (same order as the points) and is what
  is SUBTRACTED from an output pixel's position to find where it samples the input:
  ``output[b, :, y, x] = image[b, :, y - flow_y, x - flow_x]`` (TF's ``dense_image_warp``).
* ``sparse_image_warp(images, source, dest)`` moves the content at ``source_i`` to
  ``dest_i``: the displacement ``dest - source`` is interpolated with the spline *at the
  destination points* and evaluated on the output grid, so the dense flow maps every output
  pixel back to where it comes from, and pixel ``dest_i`` shows what was at ``source_i``.
* ``num_boundary_points = k`` pins the border with zero displacement exactly like TF's
  ``_get_boundary_locations``: k + 1 evenly spaced points per edge, corners included
  (4k points in total): 0 = none, 1 = the 4 corners, 2 = corners + edge midpoints (8).

Spline: f(q) = sum_i w_i phi(|q - c_i|) + v_0 + v_1 x + v_2 y with phi(r) = r^k for odd
order k and r^k log r for even k (k = 2 is the thin-plate spline). The weights solve the
(N+3) x (N+3) system [[A + reg I, P], [P^T, 0]] [w; v] = [f; 0] with A_ij = phi(|c_i - c_j|)
and P = [1, x, y], in the input dtype (float32 as in TF, or float64). phi is computed from
squared distances in a form whose value AND gradient are finite at r = 0 (coincident points,
the kernel diagonal): 0.5 * r2^(k/2) * log(max(r2, eps)) for even k and a masked
r2^(k/2) for odd k (phi(0) = 0 exactly, like scipy, not TF's tiny eps^(k/2)). Distances are
taken from coordinate differences, not |a|^2 + |b|^2 - 2ab, which in float32 loses ~1e-2 px^2
at pixel scale and would blur the exact interpolation at the control points.

The only large tensor is the (B, H*W, N) kernel between the output grid and the control
points (16 x 50176 x 76 for a batch of 224 x 224 faces, ~0.25 GB per float32 copy, and
autograd would keep several). It is evaluated in chunks of query points, each under
activation checkpointing when gradients are needed: the backward pass recomputes each chunk's
kernel instead of storing it. For that batch the live memory after the forward pass is ~0.1 GB
against ~2 GB unchunked (glibc may keep freed heap, so RSS can read higher), at the cost of
one extra kernel evaluation in the backward pass (~1 s forward+backward on 2 CPU cores).

Sampling uses ``grid_sample(align_corners=True)`` (pixel centres at -1 and +1 of the
normalised range, matching the integer-centre convention) with ``padding_mode="border"``:
positions outside the image take the nearest edge value, which is what TF's
``dense_image_warp`` does (it clamps the bilinear corners into the image) and avoids the
black seams that zero padding would pull in from outside the face crop. As in TF, the
gradient with respect to a sampling position that falls outside the image is zero.

Non-finite flows (NaN landmarks from a diverging network, or a singular solve) raise
ValueError before sampling: torch's grid_sample would silently return edge pixels for them
and its CPU backward crashes the process (pytorch/pytorch#24823).

Degenerate inputs behave as in TF: coincident control points (e.g. a landmark exactly on a
boundary point) or fewer than 3 non-collinear points make the system singular unless
``regularization > 0``. Orders >= 4 are accepted (as TF does) but then the affine term is
not the polynomial degree their kernels need, so use 1, 2 (default) or 3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# floor of r^2 inside the log of the even-order kernels (TF uses the same value)
_LOG_EPSILON = 1e-10
# elements of one (B, chunk, N) kernel block; 2^22 float32 = 16 MB per intermediate
_KERNEL_CHUNK_ELEMENTS = 1 << 22


def _check_order(order: int) -> None:
    if int(order) != order or order < 1:
        raise ValueError(f"spline order must be a positive integer, got {order}")


def polyharmonic_kernel(squared_distances: torch.Tensor, order: int) -> torch.Tensor:
    """phi as a function of r^2: r^order (odd order), r^order log r (even order).

    Value 0 and a finite (zero) gradient at r^2 = 0.
    """
    _check_order(order)
    half = order / 2
    if order % 2 == 0:
        # r^k log r = 0.5 * (r^2)^(k/2) * log(r^2); the floor inside the log keeps log(0) away
        # (the factor (r^2)^(k/2) then makes the value 0 and the gradient finite there)
        power = squared_distances if order == 2 else squared_distances.pow(half)
        return 0.5 * power * torch.log(squared_distances.clamp_min(_LOG_EPSILON))
    # odd: (r^2)^(k/2) has an infinite derivative at 0 for k = 1 (and 0 * inf = NaN in the
    # chain rule); evaluate the power on a safe placeholder there and mask the result, so the
    # value is exactly 0 and the gradient through the masked entries is exactly 0
    positive = squared_distances > 0
    safe = torch.where(positive, squared_distances, torch.ones_like(squared_distances))
    return torch.where(positive, safe.pow(half), torch.zeros_like(squared_distances))


def _pairwise_squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B|1, M, 2), (B, N, 2) -> (B, M, N) squared distances, from coordinate differences.

    x and y are handled separately: about 2x faster on CPU than differencing (B, M, N, 2)
    tensors and reducing over the last, length-2 axis."""
    dx = a[..., 0:1] - b[..., 0].unsqueeze(-2)
    dy = a[..., 1:2] - b[..., 1].unsqueeze(-2)
    return dx * dx + dy * dy


def _affine_basis(points: torch.Tensor) -> torch.Tensor:
    """(B, N, 2) -> (B, N, 3) rows (1, x, y)."""
    return torch.cat([torch.ones_like(points[..., :1]), points], dim=-1)


def polyharmonic_spline_fit(points: torch.Tensor, values: torch.Tensor, order: int = 2,
                            regularization: float | torch.Tensor = 0.0
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit the spline through ``values`` (B, N, D) at ``points`` (B, N, 2).

    Returns (kernel_weights (B, N, D), affine_weights (B, 3, D)), the affine rows being the
    coefficients of (1, x, y). ``regularization`` (a float, or a (B, 1, 1) tensor) adds
    ``reg * I`` to the kernel block (0 = exact interpolation). This is the raw solve in the
    given coordinates; ``interpolate_spline`` normalises them first (better float32 accuracy).
    """
    _check_order(order)
    if points.dim() != 3 or points.shape[-1] != 2:
        raise ValueError(f"points must be (B, N, 2), got {tuple(points.shape)}")
    if values.dim() != 3 or values.shape[:2] != points.shape[:2]:
        raise ValueError(f"values must be (B, N, D) matching points {tuple(points.shape)}, "
                         f"got {tuple(values.shape)}")
    batch, n_points, _ = points.shape
    values = values.to(points.dtype)
    kernel = polyharmonic_kernel(_pairwise_squared_distances(points, points), order)
    if isinstance(regularization, torch.Tensor) or regularization:
        kernel = kernel + regularization * torch.eye(n_points, dtype=points.dtype, device=points.device)
    affine = _affine_basis(points)                                             # (B, N, 3)
    zeros = points.new_zeros(batch, 3, 3)
    lhs = torch.cat([torch.cat([kernel, affine], dim=2),
                     torch.cat([affine.transpose(1, 2), zeros], dim=2)], dim=1)  # (B, N+3, N+3)
    rhs = torch.cat([values, values.new_zeros(batch, 3, values.shape[-1])], dim=1)
    solution = torch.linalg.solve(lhs, rhs)
    return solution[:, :n_points], solution[:, n_points:]


def _kernel_part(query: torch.Tensor, centers: torch.Tensor, kernel_weights: torch.Tensor,
                 order: int) -> torch.Tensor:
    return polyharmonic_kernel(_pairwise_squared_distances(query, centers), order) @ kernel_weights


def polyharmonic_spline_eval(query_points: torch.Tensor, points: torch.Tensor,
                             kernel_weights: torch.Tensor, affine_weights: torch.Tensor,
                             order: int = 2) -> torch.Tensor:
    """Evaluate a fitted spline at ``query_points`` (B, M, 2) or (1, M, 2) (shared by the
    batch) -> (B, M, D). The kernel is computed in chunks of query points (checkpointed when
    a gradient is needed) so a whole image grid fits in little memory."""
    _check_order(order)
    if query_points.dim() != 3 or query_points.shape[-1] != 2:
        raise ValueError(f"query_points must be (B, M, 2), got {tuple(query_points.shape)}")
    batch, n_points, _ = points.shape
    n_query = query_points.shape[1]
    query_points = query_points.to(points.dtype)
    chunk = max(1, _KERNEL_CHUNK_ELEMENTS // max(1, batch * n_points))
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (query_points, points, kernel_weights))
    parts = []
    for start in range(0, n_query, chunk):
        query_chunk = query_points[:, start:start + chunk]
        if needs_grad and n_query > chunk:
            parts.append(checkpoint(_kernel_part, query_chunk, points, kernel_weights, order,
                                    use_reentrant=False))
        else:
            parts.append(_kernel_part(query_chunk, points, kernel_weights, order))
    kernel_values = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return kernel_values + _affine_basis(query_points) @ affine_weights


def _scale_invariant(order: int) -> bool:
    """Whether scaling all coordinates by s only scales phi by s^order up to an affine term
    (r^k for odd k; r^2 log r picks up s^2 log(s) r^2, whose contribution is a constant
    because the weights are orthogonal to (1, x, y)). True for odd orders and order 2."""
    return order % 2 == 1 or order == 2


def interpolate_spline(train_points: torch.Tensor, train_values: torch.Tensor,
                       query_points: torch.Tensor, order: int = 2,
                       regularization: float = 0.0) -> torch.Tensor:
    """Fit a polyharmonic spline to (train_points, train_values) and evaluate it at
    query_points; (B, N, 2), (B, N, D), (B|1, M, 2) -> (B, M, D). TF's ``interpolate_spline``.

    For accuracy in float32 the points are first centred on the training points' centroid
    and divided by their largest deviation from it, per batch element. The interpolant is
    mathematically unchanged (polyharmonic splines with an affine term are invariant to
    translation, and to scaling for odd orders and order 2, with the regularization rescaled
    to regularization / s^order), so the normalisation is detached from autograd; it cuts
    the float32 error of a 224-pixel face warp from ~8e-3 px to ~1e-3 px. Even orders >= 4
    are only centred.
    """
    _check_order(order)
    if train_points.dim() != 3 or train_points.shape[-1] != 2:
        raise ValueError(f"train_points must be (B, N, 2), got {tuple(train_points.shape)}")
    with torch.no_grad():
        centre = train_points.mean(dim=1, keepdim=True)                          # (B, 1, 2)
        if _scale_invariant(order):
            radius = (train_points - centre).abs().amax(dim=(1, 2), keepdim=True)  # (B, 1, 1)
            scale = torch.where(radius > 0, radius, torch.ones_like(radius))
        else:
            scale = torch.ones_like(centre[..., :1])
    points = (train_points - centre) / scale
    query = (query_points.to(train_points.dtype) - centre) / scale
    if regularization:
        # per batch element: reg / s^order, as a (B, 1, 1) tensor added to the kernel block
        regularization = regularization / scale.pow(order)
    kernel_weights, affine_weights = polyharmonic_spline_fit(points, train_values, order, regularization)
    return polyharmonic_spline_eval(query, points, kernel_weights, affine_weights, order)


def pixel_grid(height: int, width: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
    """(H, W, 2) pixel-centre coordinates (x, y); grid[y, x] = (x, y)."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=dtype, device=device),
                            torch.arange(width, dtype=dtype, device=device), indexing="ij")
    return torch.stack([xs, ys], dim=-1)


def dense_image_warp(images: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """output[b, :, y, x] = images[b, :, y - flow_y, x - flow_x], bilinear, border padding.

    images (B, C, H, W), flow (B, H, W, 2) holding (flow_x, flow_y) in pixels.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    batch, _, height, width = images.shape
    if flow.shape != (batch, height, width, 2):
        raise ValueError(f"flow must be {(batch, height, width, 2)}, got {tuple(flow.shape)}")
    if not bool(torch.isfinite(flow).all()):
        # grid_sample's CPU backward segfaults on NaN/inf sampling positions and its forward
        # silently returns edge pixels for them (pytorch/pytorch#24823): fail loudly instead
        raise ValueError("flow has NaN or infinite values (diverged or coincident control points?)")
    source = pixel_grid(height, width, flow.dtype, flow.device) - flow        # (B, H, W, 2) pixels
    # align_corners=True: pixel 0 -> -1, pixel size-1 -> +1 (a 1-pixel axis maps anywhere to 0)
    scale = torch.tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)],
                         dtype=flow.dtype, device=flow.device)
    return F.grid_sample(images, source * scale - 1.0, mode="bilinear", padding_mode="border",
                         align_corners=True)


def boundary_points(height: int, width: int, num_boundary_points: int,
                    dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """(4k, 2) (x, y) points on the image border, as TF's ``_get_boundary_locations``:
    k + 1 evenly spaced points per edge including the corners (k = num_boundary_points)."""
    if num_boundary_points < 0:
        raise ValueError(f"num_boundary_points must be >= 0, got {num_boundary_points}")
    if num_boundary_points == 0:
        return torch.zeros(0, 2, dtype=dtype, device=device)
    xs = torch.linspace(0, width - 1, num_boundary_points + 1, dtype=torch.float64)
    ys = torch.linspace(0, height - 1, num_boundary_points + 1, dtype=torch.float64)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    on_border = ((grid_x == 0) | (grid_x == width - 1) | (grid_y == 0) | (grid_y == height - 1))
    return torch.stack([grid_x[on_border], grid_y[on_border]], dim=-1).to(dtype=dtype, device=device)


def sparse_image_warp(images: torch.Tensor, source_points: torch.Tensor, dest_points: torch.Tensor,
                      order: int = 2, regularization: float = 0.0,
                      num_boundary_points: int = 2, flow_grid: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp ``images`` (B, C, H, W) so the content at ``source_points`` (B, N, 2) moves to
    ``dest_points`` (B, N, 2), both (x, y) pixels; -> (warped (B, C, H, W), flow (B, H, W, 2)).

    The displacement dest - source is interpolated at the dest points (plus zero-displacement
    border points) and evaluated on every output pixel; see the module docstring.
    ``regularization`` is in pixel units (added to the kernel diagonal of the spline written in
    pixels, like scipy's ``RBFInterpolator(smoothing=...)``); 0 interpolates exactly.

    ``flow_grid = G`` evaluates the spline on a G x G grid spanning the image corner to corner
    and resamples that flow bilinearly to every pixel (``align_corners=True``: the coarse
    samples sit exactly on their pixel positions). The spline is smooth, so for face warps
    (a few pixels of displacement) G = 57 on a 224 image (one sample per ~4 px) stays within
    ~0.01 px of the exact flow (tests/models/test_warp.py) at 1/16 of the spline work; None = exact.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    batch, _, height, width = images.shape
    for name, points in (("source_points", source_points), ("dest_points", dest_points)):
        if points.dim() != 3 or points.shape[0] != batch or points.shape[-1] != 2:
            raise ValueError(f"{name} must be ({batch}, N, 2), got {tuple(points.shape)}")
    if source_points.shape != dest_points.shape:
        raise ValueError(f"source_points {tuple(source_points.shape)} and dest_points "
                         f"{tuple(dest_points.shape)} differ in shape")
    dtype, device = images.dtype, images.device
    source_points, dest_points = source_points.to(dtype), dest_points.to(dtype)
    displacements = dest_points - source_points
    border = boundary_points(height, width, num_boundary_points, dtype, device)
    if len(border):
        dest_points = torch.cat([dest_points, border.expand(batch, -1, -1)], dim=1)
        displacements = torch.cat([displacements, displacements.new_zeros(batch, len(border), 2)], dim=1)
    if flow_grid is None or flow_grid >= max(height, width):
        grid = pixel_grid(height, width, dtype, device).reshape(1, height * width, 2)
        flow = interpolate_spline(dest_points, displacements, grid, order, regularization)
        flow = flow.reshape(batch, height, width, 2)
    else:
        if flow_grid < 2:
            raise ValueError(f"flow_grid must be >= 2 (or None), got {flow_grid}")
        ys, xs = torch.meshgrid(torch.linspace(0, height - 1, flow_grid, dtype=dtype, device=device),
                                torch.linspace(0, width - 1, flow_grid, dtype=dtype, device=device), indexing="ij")
        coarse = torch.stack([xs, ys], dim=-1).reshape(1, flow_grid * flow_grid, 2)
        flow = interpolate_spline(dest_points, displacements, coarse, order, regularization)
        flow = flow.reshape(batch, flow_grid, flow_grid, 2).permute(0, 3, 1, 2)
        flow = F.interpolate(flow, size=(height, width), mode="bilinear", align_corners=True).permute(0, 2, 3, 1)
    return dense_image_warp(images, flow), flow
