"""Pictures of localization heads, drawn with Pillow: head maps, the final box, the S_img curve."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image, ImageDraw

PANEL = 160


def heatmap(grid: torch.Tensor, size: int = PANEL) -> Image.Image:
    """A (h, w) map as a black-to-yellow image, min-max scaled, nearest-neighbour upsampled."""
    g = grid.detach().float().cpu()
    g = (g - g.min()) / (g.max() - g.min() + 1e-12)
    r = (255 * g.clamp(0, 1)).to(torch.uint8)
    b = (255 * (1 - g) * 0.4).to(torch.uint8)
    rgb = torch.stack([r, (r.float() * 0.85).to(torch.uint8), b], -1).numpy()
    return Image.fromarray(rgb, "RGB").resize((size, size), Image.NEAREST)


def _with_box(image: Image.Image, box: Sequence[float], size: int, colour=(255, 40, 40)) -> Image.Image:
    w, h = image.size
    scale = size / max(w, h)
    im = image.convert("RGB").resize((max(1, round(w * scale)), max(1, round(h * scale))))
    x1, y1, x2, y2 = box
    ImageDraw.Draw(im).rectangle(
        [x1 * im.width, y1 * im.height, x2 * im.width - 1, y2 * im.height - 1], outline=colour, width=2
    )
    return im


def render_located(image: Image.Image, located, gt_box: Sequence[float] | None = None, mask=None) -> Image.Image:
    """One strip: the image with the predicted box (red; ground truth green if given), each
    head's map labelled L<layer>H<head> (at most 10), and the combined smoothed map with its
    box in processed-image coordinates."""
    panels = []
    first = _with_box(image, located.box, PANEL)
    if gt_box is not None:
        first = _with_box(first, gt_box, PANEL, colour=(40, 200, 60))
    panels.append(("answer", first))
    if mask is not None:
        m = Image.fromarray((mask.cpu().numpy() * 255).astype("uint8"), "L").resize(first.size)
        panels.append(("SAM mask", Image.composite(Image.new("RGB", first.size, (255, 60, 60)), first, m)))
    names = ["all heads"] if located.heads == "all" else [f"L{l}H{h}" for l, h in located.heads]
    if located.heads != "all":
        for name, grid in list(zip(names, located.head_maps))[:10]:
            panels.append((name, heatmap(grid)))
    panels.append(("combined", _with_box(heatmap(located.combined), located.box_processed, PANEL)))
    return _strip(panels)


def _strip(panels) -> Image.Image:
    pad, label = 4, 14
    width = sum(p.width for _, p in panels) + pad * (len(panels) + 1)
    height = max(p.height for _, p in panels) + label + 2 * pad
    out = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    x = pad
    for name, p in panels:
        draw.text((x, pad), name, fill=(0, 0, 0))
        out.paste(p, (x, pad + label))
        x += p.width + pad
    return out


def render_curve(
    values_desc: Sequence[float], knee: int, title: str = "S_img, heads sorted", size=(420, 240)
) -> Image.Image:
    """The descending S_img curve with its chord and the knee marked."""
    w, h = size
    m = 30
    out = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(out)
    v = [float(x) for x in values_desc]
    lo, hi = min(v), max(v)
    span = hi - lo or 1.0
    n = max(len(v) - 1, 1)
    pts = [(m + i * (w - 2 * m) / n, h - m - (y - lo) / span * (h - 2 * m)) for i, y in enumerate(v)]
    draw.line([(m, m), (m, h - m), (w - m, h - m)], fill=(0, 0, 0))
    draw.line([pts[0], pts[-1]], fill=(160, 160, 160))
    draw.line(pts, fill=(40, 80, 220), width=2)
    kx, ky = pts[knee]
    draw.ellipse([kx - 4, ky - 4, kx + 4, ky + 4], outline=(220, 40, 40), width=2)
    draw.text((m, 6), f"{title}; knee at rank {knee + 1} of {len(v)} (S_img {v[knee]:.3f})", fill=(0, 0, 0))
    return out
