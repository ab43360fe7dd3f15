"""Upsampling and resizing (MIL image_resizing)."""

from __future__ import annotations

import math

import torch

from publisher.executor.errors import ExecutorError
from publisher.executor.ops.registry import OpArgs, Result, register


def _nearest(x: torch.Tensor, out_h: int, out_w: int, ratio_h: float, ratio_w: float) -> torch.Tensor:
    # Output index i reads input index floor(i * ratio), ratio = input size / output size.
    rows = torch.clamp((torch.arange(out_h, dtype=torch.float64) * ratio_h).floor().long(), max=x.shape[-2] - 1)
    cols = torch.clamp((torch.arange(out_w, dtype=torch.float64) * ratio_w).floor().long(), max=x.shape[-1] - 1)
    return x.index_select(-2, rows).index_select(-1, cols)


@register("upsample_nearest_neighbor", native_half=True)
def upsample_nearest_neighbor(a: OpArgs) -> Result:
    x = a["x"]
    sh, sw = a.float("scale_factor_height", 1.0), a.float("scale_factor_width", 1.0)
    if sh.is_integer() and sw.is_integer():
        return x.repeat_interleave(int(sh), dim=-2).repeat_interleave(int(sw), dim=-1)
    out_h, out_w = math.floor(sh * x.shape[-2]), math.floor(sw * x.shape[-1])
    # Core ML samples by the size ratio, not by 1/scale (they differ once the output size is floored).
    return _nearest(x, out_h, out_w, x.shape[-2] / out_h, x.shape[-1] / out_w)


@register("resize_nearest_neighbor", native_half=True)
def resize_nearest_neighbor(a: OpArgs) -> Result:
    x = a["x"]
    out_h, out_w = a.int("target_size_height"), a.int("target_size_width")
    return _nearest(x, out_h, out_w, x.shape[-2] / out_h, x.shape[-1] / out_w)


def _lerp_axis(x: torch.Tensor, dim: int, grid: torch.Tensor) -> torch.Tensor:
    size = x.shape[dim]
    grid = grid.clamp(0, size - 1)
    low = grid.floor().long()
    high = torch.clamp(low + 1, max=size - 1)
    shape = [1] * x.dim()
    shape[dim] = -1
    weight = (grid - low).to(x.dtype).reshape(shape)
    return x.index_select(dim, low) * (1 - weight) + x.index_select(dim, high) * weight


def _grid(mode: str, size_in: int, size_out: int, spacing: float | None = None) -> torch.Tensor:
    """Sampling positions in input coordinates (see MIL resize_bilinear's sampling modes)."""
    i = torch.arange(size_out, dtype=torch.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if size_out == 1:
            return torch.full((1,), (size_in - 1) / 2 if mode == "ALIGN_CORNERS" else 0.0, dtype=torch.float64)
        return i * ((size_in - 1) / (size_out - 1))
    if mode == "DEFAULT":
        step = (
            spacing
            if spacing is not None
            else ((size_in - size_in / size_out) / (size_out - 1) if size_out > 1 else 0.0)
        )
        return i * step
    if mode == "OFFSET_CORNERS":
        delta = max(1, size_in - 1) / size_out
        return 0.5 * delta + i * delta
    if mode == "UNALIGN_CORNERS":
        step = spacing if spacing is not None else size_in / size_out
        return i * step + 0.5 * step - 0.5
    raise ExecutorError(f"unknown sampling_mode {mode!r}")


def _bilinear(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return _lerp_axis(_lerp_axis(x, x.dim() - 2, rows), x.dim() - 1, cols)


@register("resize_bilinear")
def resize_bilinear(a: OpArgs) -> Result:
    x = a["x"]
    mode = a.str("sampling_mode", "DEFAULT")
    out_h, out_w = a.int("target_size_height", 1), a.int("target_size_width", 1)
    return _bilinear(x, _grid(mode, x.shape[-2], out_h), _grid(mode, x.shape[-1], out_w))


@register("upsample_bilinear")
def upsample_bilinear(a: OpArgs) -> Result:
    x = a["x"]
    sh, sw = a.float("scale_factor_height", 1.0), a.float("scale_factor_width", 1.0)
    h, w = x.shape[-2], x.shape[-1]
    out_h, out_w = math.floor(h * sh), math.floor(w * sw)
    align = a.bool("align_corners", True)
    half_pixel = a.bool("half_pixel_centers", not align)
    if align:
        return _bilinear(x, _grid("ALIGN_CORNERS", h, out_h), _grid("ALIGN_CORNERS", w, out_w))
    # Without aligned corners the grid steps by input/output size (the scale recomputed from the
    # floored output size, as MIL defines it), optionally from the half-pixel offset.
    mode = "UNALIGN_CORNERS" if half_pixel else "DEFAULT"
    return _bilinear(x, _grid(mode, h, out_h, h / out_h), _grid(mode, w, out_w, w / out_w))


@register("resize")
def resize(a: OpArgs) -> Result:
    # iOS17: the last `resized_dims` dims take their sizes from the end of `shape` (0 keeps the size).
    x = a["x"]
    dims = a.int("resized_dims")
    targets = a.ints("shape")[len(a.ints("shape")) - dims :]
    mode = a.str("sampling_mode", "DEFAULT")
    nearest = a.str("interpolation_mode", "LINEAR") == "NEAREST_NEIGHBOR"
    for offset, target in enumerate(targets):
        dim = x.dim() - dims + offset
        grid = _grid(mode, x.shape[dim], target or x.shape[dim])
        if nearest:
            index = torch.clamp(torch.floor(grid + 0.5).long(), 0, x.shape[dim] - 1)
            x = x.index_select(dim, index)
        else:
            x = _lerp_axis(x, dim, grid)
    return x


@register("crop", native_half=True)
def crop(a: OpArgs) -> Result:
    x = a["x"]
    top, bottom = a.ints("crop_height")
    left, right = a.ints("crop_width")
    return x[..., top : x.shape[-2] - bottom, left : x.shape[-1] - right]


def _box_corners(boxes: torch.Tensor, mode: str) -> torch.Tensor:
    """[N, 4] boxes in `box_coordinate_mode` -> [N, 4] (h_start, w_start, h_end, w_end)."""
    if mode.endswith("WIDTH_FIRST"):
        boxes = boxes[:, [1, 0, 3, 2]]
    if mode.startswith("CENTER_SIZE"):
        center, size = boxes[:, :2], boxes[:, 2:]
        boxes = torch.cat([center - size / 2, center + size / 2], dim=1)
    return boxes


def _lerp_axis_or_pad(x: torch.Tensor, dim: int, grid: torch.Tensor, pad: float) -> torch.Tensor:
    """_lerp_axis, except that positions outside [0, size - 1] read `pad` (crop_resize's pad_value)."""
    inside = ((grid >= 0) & (grid <= x.shape[dim] - 1)).reshape([-1 if d == dim else 1 for d in range(x.dim())])
    return torch.where(inside, _lerp_axis(x, dim, grid), torch.tensor(pad, dtype=x.dtype))


@register("crop_resize")
def crop_resize(a: OpArgs) -> Result:
    x = a["x"]
    height, width = x.shape[-2:]
    roi = a.opt("roi")
    if roi is not None:
        # iOS15/16: roi [N, 1, 4 or 5, 1, 1]; 4 values crop every image, 5 lead with the image index.
        roi = roi.reshape(roi.shape[0], -1).double()
        indices = roi[:, 0].long() if roi.shape[1] == 5 else None
        boxes = roi[:, -4:]
    else:
        boxes = a["boxes"].double()
        box_indices = a.opt("box_indices")
        indices = torch.arange(boxes.shape[0]) if box_indices is None else box_indices.long()
    boxes = _box_corners(boxes, a.str("box_coordinate_mode", "CORNERS_HEIGHT_FIRST"))
    if a.bool("normalized_coordinates"):
        boxes = boxes * torch.tensor([height - 1, width - 1] * 2, dtype=torch.float64)
    boxes = boxes * a.float("spatial_scale", 1.0)
    mode = a.str("sampling_mode", "DEFAULT")
    out_h, out_w = a.int("target_height", 1), a.int("target_width", 1)
    pad = a.float("pad_value", 0.0)
    crops = []
    for n, (h0, w0, h1, w1) in enumerate(boxes.tolist()):
        # The box spans (end - start) input steps: it samples as a resize of a (span + 1)-pixel axis.
        rows = h0 + _grid(mode, h1 - h0 + 1, out_h)
        cols = w0 + _grid(mode, w1 - w0 + 1, out_w)
        images = x if indices is None else x[indices[n]]
        rank = images.dim()
        crops.append(_lerp_axis_or_pad(_lerp_axis_or_pad(images, rank - 2, rows, pad), rank - 1, cols, pad))
    out = torch.stack(crops)
    # iOS15/16 keep a batch axis ([N, B, C, h, w], B = 1 with image indices); iOS17 has [N, C, h, w].
    return out.unsqueeze(1) if roi is not None and indices is not None else out


def _pad_indices(index: torch.Tensor, size: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the padded image: the index read, and whether it lies inside (else padding_value)."""
    inside = (index >= 0) & (index < size)
    if mode == "reflection":
        period = max(1, 2 * (size - 1))
        index = torch.remainder(index, period)
        index = torch.where(index >= size, period - index, index)
    elif mode == "symmetric":
        index = torch.remainder(index, 2 * size)
        index = torch.where(index >= size, 2 * size - 1 - index, index)
    elif mode not in ("constant", "border"):
        raise ExecutorError(f"unknown padding_mode {mode!r}")
    return index.clamp(0, size - 1), inside | (mode != "constant")


def _to_pixels(coords: torch.Tensor, size: int, mode: str, align_corners: bool) -> torch.Tensor:
    if mode == "unnormalized":
        return coords
    if mode == "normalized_minus_one_to_one":
        coords = (coords + 1) / 2
    elif mode != "normalized_zero_to_one":
        raise ExecutorError(f"unknown coordinates_mode {mode!r}")
    return coords * (size - 1) if align_corners else coords * size - 0.5


def _sample(a: OpArgs, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Sample x [B, C, H, W] at coords [B, H2, W2, 2] ((w, h) pairs, in the op's coordinates_mode)."""
    batch, channels, height, width = x.shape
    mode, align = a.str("coordinates_mode"), a.bool("align_corners")
    px = _to_pixels(coords[..., 0], width, mode, align)
    py = _to_pixels(coords[..., 1], height, mode, align)
    if a.str("sampling_mode").lower() == "nearest":
        taps = [(torch.floor(py + 0.5), torch.floor(px + 0.5), torch.ones_like(px))]
    else:
        y0, x0 = torch.floor(py), torch.floor(px)
        fy, fx = py - y0, px - x0
        taps = [
            (y0, x0, (1 - fy) * (1 - fx)),
            (y0, x0 + 1, (1 - fy) * fx),
            (y0 + 1, x0, fy * (1 - fx)),
            (y0 + 1, x0 + 1, fy * fx),
        ]
    padding = a.str("padding_mode")
    pad = torch.tensor(a.float("padding_value"), dtype=x.dtype)
    flat = x.reshape(batch, channels, height * width)
    out = torch.zeros((batch, channels, *coords.shape[1:3]), dtype=x.dtype)
    for ty, tx, weight in taps:
        iy, y_in = _pad_indices(ty.long(), height, padding)
        ix, x_in = _pad_indices(tx.long(), width, padding)
        index = (iy * width + ix).reshape(batch, 1, -1).expand(batch, channels, -1)
        values = flat.gather(2, index).reshape(out.shape)
        values = torch.where((y_in & x_in).unsqueeze(1), values, pad)
        out = out + values * weight.to(x.dtype).unsqueeze(1)
    return out


@register("resample")
def resample(a: OpArgs) -> Result:
    return _sample(a, a["x"], a["coordinates"].double())


@register("affine")
def affine(a: OpArgs) -> Result:
    x = a["x"]
    out_h, out_w = a.int("output_height"), a.int("output_width")
    align = a.bool("align_corners")

    def axis(size: int) -> torch.Tensor:
        # Output pixel positions in [-1, 1] (normalized_minus_one_to_one, the only mode MIL allows).
        i = torch.arange(size, dtype=torch.float64)
        if align:
            return i * (2 / (size - 1)) - 1 if size > 1 else torch.zeros(1, dtype=torch.float64)
        return (2 * i + 1) / size - 1

    ys, xs = torch.meshgrid(axis(out_h), axis(out_w), indexing="ij")
    m = a["transform_matrix"].double().expand(x.shape[0], 6).reshape(-1, 6, 1, 1)
    coords = torch.stack([m[:, 0] * xs + m[:, 1] * ys + m[:, 2], m[:, 3] * xs + m[:, 4] * ys + m[:, 5]], dim=-1)
    return _sample(a, x, coords)
