"""Perception Magnifier, the image side: from H* over the token grid to the magnified image.

Post-processing (min-max, standardise, x alpha, sigmoid, k x k box filter), upsampling to the
square view of the original image (padded with the mean colour, as LLaVA-1.5 preprocesses), and
magnification by inverse-transform sampling of the row/column max marginals (bilinear). Pure
numpy/torch/PIL, tested on hand-made inputs; the ``official_*`` functions are the reference's
arithmetic (github ShunqiM/PM @ 58c2c0f), checked against its fixtures (tests/test_parity_pm.py).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .technique import pad_to_square

VIEWS = ("pad", "crop")  # square_view: padded as LLaVA-1.5 | centre-cropped as a cropping processor


def enhance(grid: np.ndarray, alpha: float, kernel: int) -> np.ndarray:
    """min-max -> standardise (sample std, as torch's) -> x alpha -> sigmoid -> k x k box filter (edge-replicated)."""
    g = np.asarray(grid, dtype=np.float64)
    span = g.max() - g.min()
    g = (g - g.min()) / span if span > 0 else np.zeros_like(g)
    sd = g.std(ddof=1) if g.size > 1 else 0.0
    z = (g - g.mean()) / sd if sd > 0 else np.zeros_like(g)
    s = 1.0 / (1.0 + np.exp(-alpha * z))
    if kernel > 1:
        r = kernel // 2
        p = np.pad(s, r, mode="edge")
        c = np.cumsum(np.cumsum(np.pad(p, ((1, 0), (1, 0))), axis=0), axis=1)  # summed-area table
        h, w = s.shape
        s = (
            c[kernel : kernel + h, kernel : kernel + w]
            - c[:h, kernel : kernel + w]
            - c[kernel : kernel + h, :w]
            + c[:h, :w]
        ) / kernel**2
    return s


def upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic upsampling of the grid map to ``size`` = (width, height), clipped at 0."""
    img = Image.fromarray(np.asarray(grid, dtype=np.float32), mode="F").resize(size, Image.BICUBIC)
    return np.clip(np.asarray(img, dtype=np.float64), 0.0, None)


def inverse_cdf(marginal: np.ndarray, n_out: int) -> np.ndarray:
    """Source pixel-centre coordinates for ``n_out`` output pixels: inverse-transform sampling.

    The marginal is a density over pixel cells [i, i+1); output pixel j takes the source point
    where the cumulative density reaches (j + 0.5) / n_out. A uniform density gives j*N/n_out
    scaled centres, i.e. the identity when n_out == N. The mapping is monotone.
    """
    m = np.clip(np.nan_to_num(np.asarray(marginal, dtype=np.float64), nan=0.0), 0.0, None)
    if not m.max() > 0:
        m = np.ones_like(m)
    m = np.maximum(m, m.max() * 1e-12)  # strictly increasing CDF: every row keeps a sliver
    edges = np.concatenate([[0.0], np.cumsum(m)])
    edges /= edges[-1]
    u = (np.arange(n_out) + 0.5) / n_out
    return np.interp(u, edges, np.arange(len(m) + 1, dtype=np.float64)) - 0.5


def _bilinear_rows(a: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    n = a.shape[axis]
    c = np.clip(coords, 0, n - 1)
    i0 = np.floor(c).astype(np.int64)
    i1 = np.minimum(i0 + 1, n - 1)
    f = (c - i0).astype(np.float32)
    shape = [1] * a.ndim
    shape[axis] = -1
    f = f.reshape(shape)
    return np.take(a, i0, axis=axis) * (1 - f) + np.take(a, i1, axis=axis) * f


def magnify(
    image: Image.Image | np.ndarray, density: np.ndarray, out_size: tuple[int, int] | None = None
) -> Image.Image:
    """Resample ``image`` so that rows/columns get output space in proportion to the density's
    row/column maxima (separable inverse-CDF sampling, bilinear). out_size = (width, height)."""
    arr = np.asarray(image)
    squeeze = arr.ndim == 2
    if squeeze:
        arr = arr[:, :, None]
    h, w = arr.shape[:2]
    if density.shape != (h, w):
        raise ValueError(f"density {density.shape} does not match the image {(h, w)}")
    out_w, out_h = out_size or (w, h)
    ys = inverse_cdf(density.max(axis=1), out_h)
    xs = inverse_cdf(density.max(axis=0), out_w)
    out = _bilinear_rows(_bilinear_rows(arr.astype(np.float32), ys, 0), xs, 1)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return Image.fromarray(out[:, :, 0] if squeeze else out)


def official_enhance(grid: np.ndarray, alpha: float, kernel: int) -> torch.Tensor:
    """revise_mask (API_LLaVA/main.py:55-70) in float32 torch: min-max (``normalize(.., "min")``,
    :39-45), subtract the mean, divide by the unbiased std, x alpha, sigmoid, clamp to [0, 1]
    (``enhance``, :47-53), then a k x k mean filter with replicate padding (Conv2d, :60-66).
    A constant map gives NaN (0/0), as there."""
    m = torch.Tensor(np.asarray(grid))  # torch.Tensor(...) as model_generate.py:403: float32
    m = (m - m.min()) / (m.max() - m.min())
    m = torch.sigmoid((m - m.mean()) / m.std() * alpha).clamp(0, 1)
    r = (kernel - 1) // 2
    weight = torch.ones(1, 1, kernel, kernel) / kernel**2
    return torch.nn.functional.conv2d(torch.nn.functional.pad(m[None, None], (r, r, r, r), mode="replicate"), weight)[
        0, 0
    ]


def official_quantise(grid: torch.Tensor) -> np.ndarray:
    """toImg (API_LLaVA/main.py:24-25): torchvision's ToPILImage on a float map multiplies by 255
    and truncates with ``.byte()`` (NaN becomes 0 on this platform)."""
    return grid.mul(255).byte().numpy()


def official_upsample(grid8: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """invtrans (API_LLaVA/main.py:27-28): PIL bicubic resize of the 8-bit map to ``size`` = (width, height)."""
    return np.asarray(Image.fromarray(np.asarray(grid8, dtype=np.uint8), mode="L").resize(size, Image.BICUBIC))


def official_inverse_sampling(marginal: np.ndarray, n_out: int) -> np.ndarray:
    """cumulative_distribution + inverse_sampling (attention_resampler.py:43-54): cdf = cumsum / last,
    then source indices at ``linspace(0, 1, n_out)`` by linear interpolation of (cdf -> 0..N-1),
    extrapolated outside. A flat marginal samples u * N - 1 for u in linspace(0, 1, n_out), i.e.
    -1 .. N-1: about a pixel's shift, an N/(N-1) zoom, and a first row/column at -1, off the image."""
    from scipy.interpolate import interp1d

    cdf = np.cumsum(marginal)
    cdf = cdf / cdf[-1]
    return interp1d(cdf, np.arange(len(cdf)), bounds_error=False, fill_value="extrapolate")(np.linspace(0, 1, n_out))


def official_magnify(
    image: Image.Image | np.ndarray, density: np.ndarray, out_size: tuple[int, int] | None = None
) -> Image.Image:
    """attention_sampling(method='bilinear') (attention_resampler.py:56-108) then ``astype(np.uint8)``
    (model_generate.py:509-511): marginals are the row/column maxima, each channel is sampled by
    ``scipy.ndimage.map_coordinates(order=1)`` (constant 0 outside; on a uint8 image it rounds to
    uint8 itself, so the final truncation keeps integers). out_size = (width, height)."""
    from scipy.ndimage import map_coordinates

    arr = np.asarray(image)
    h, w = arr.shape[:2]
    if density.shape != (h, w):
        raise ValueError(f"density {density.shape} does not match the image {(h, w)}")
    out_w, out_h = out_size or (w, h)
    xs = official_inverse_sampling(np.max(density, axis=0), out_w)
    ys = official_inverse_sampling(np.max(density, axis=1), out_h)
    gx, gy = np.meshgrid(xs, ys)
    out = np.zeros((out_h, out_w, arr.shape[2]))
    for c in range(arr.shape[2]):
        out[:, :, c] = map_coordinates(arr[:, :, c], [gy, gx], order=1)
    return Image.fromarray(out.astype(np.uint8), "RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the HF image processors see it (RGBA composited on white, grayscale repeated)."""
    from transformers.image_transforms import convert_to_rgb

    return convert_to_rgb(image) if image.mode != "RGB" else image


def square_view(image: Image.Image, mode: str = "pad", fill=(0, 0, 0)) -> Image.Image:
    """The square the model's image grid covers: the image padded to a centred square with
    ``fill`` (LLaVA-1.5's expand2square: ``technique.pad_to_square``), or its central square (a centre-cropping
    processor)."""
    image = to_rgb(image)
    w, h = image.size
    if w == h:
        return image
    if mode == "pad":
        return pad_to_square(image, fill)[0]
    if mode == "crop":
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        return image.crop((left, top, left + s, top + s))
    raise ValueError(f"view={mode!r}: use one of {VIEWS}")


def perception_density(
    h_star: np.ndarray, grid: int | tuple[int, int], size: tuple[int, int], alpha: float, kernel: int
):
    """H* over the token grid (side, or rows x cols) -> (enhanced grid map, density at ``size`` = (width, height))."""
    g = enhance(np.asarray(h_star).reshape(_grid_hw(grid)), alpha, kernel)
    return g, upsample(g, size)


def _grid_hw(grid: int | tuple[int, int]) -> tuple[int, int]:
    return (grid, grid) if isinstance(grid, int) else tuple(grid)
