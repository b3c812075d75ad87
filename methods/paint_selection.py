"""PAINT's token selection: which image tokens methods/paint.py boosts, and as which kind.

- local tokens: the top ``top_ratio`` (0.25) of patches by the vision tower's layer-0
  CLS->patch attention (summed over heads): patches carrying grounded object detail;
- summary tokens: patches whose CLS attention in the penultimate vision layer (the layer
  LLaVA reads its features from) is an IQR outlier (> Q3 + 1.5 IQR): the "register"-like
  tokens that aggregate the whole image. They are removed from the local set;
- spatial tokens (optional, ``spatial_ratio``), two variants (``spatial``): ``"official"``
  is what the official code computes (see ``spatial_official``: effectively arbitrary rows);
  ``"grid"`` (ours, the paper's evenly spread tokens) is a stratified grid. With N patches on
  a G_h x G_w grid, m = max(1, round(sqrt(spatial_ratio * N))) and the grid is cut into
  m x m near-equal cells (row band i spans rows [lo, hi) = [floor(i*G_h/m),
  floor((i+1)*G_h/m)), columns likewise); each cell contributes its centre patch (row
  (lo + hi - 1) // 2, column likewise). Every cell holds exactly one spatial token, so the
  set covers the grid evenly whatever the attention does; tokens already local or summary
  keep their own role.

A CLS-free candidate (``selection_source="received"``; ours, not in the paper or its code),
measured as a substitute for towers without CLS (SigLIP, Qwen2.5-VL): the score of patch k in
a vision layer is the attention it *receives* from the patches, summed over heads, averaged
over the patch queries, relative to uniform: r_k = sum_h n_keys * mean_q p_h(q, k) (CLS
query and key left out). Local = top ``top_ratio`` of the local layer's scores, summary = IQR
outliers of the summary layer's, as with CLS. It runs on CLIP towers only, where the CLS
selection is the ground truth: there it does not reproduce the local set (agreement at or
below chance, docs/paint.md), so the towers without CLS stay refused (methods/paint.py ``REFUSED``).

Pure functions on (batch, patches) attention maps, then ``TokenSelector``: the vision-tower
captures that record the maps in the same forward as the language-model edit, turned into a
``TokenSelection`` once per vision-tower pass.

Parity with the official code (hasanar1f/PAINT @ 2a9e8f8, ``modPAI/``): each step below
cites the official file:line it reproduces; docs/paint.md has the table.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from . import hooks
from .technique import RequestError


def cls_attention(probs: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(batch, heads, 1, patches) CLS-row probabilities -> (batch, patches), summed over heads in ``dtype``.

    Official: ``vit_attn[layer][0, :, 0, -576:].sum(dim=0)`` on the fp16 attentions of the
    fp16 model (clip_encoder.py:38-39); ``dtype=float16`` reproduces that rounding.
    """
    return probs[:, :, 0].to(dtype).sum(dim=1)


def received_attention(probs: torch.Tensor) -> torch.Tensor:
    """(batch, heads, queries, keys) probabilities of one attention call -> (batch, keys): the
    attention each key receives, summed over heads, averaged over the queries, times the number
    of keys (a uniform head gives 1 per key, whatever the number of keys: comparable across
    attention calls of different sizes, e.g. Qwen2.5-VL's windows)."""
    return probs.float().sum(dim=1).mean(dim=1) * probs.shape[-1]


def select_local(attn: torch.Tensor, top_ratio: float) -> torch.Tensor:
    """Bool (batch, N): the top int(N * top_ratio) patches of each row (at least one when ratio > 0).

    Official: ``torch.topk(top_attn, int(576 * 0.25))`` (clip_encoder.py:42); ties are broken
    by ``torch.topk`` on both sides (on CUDA in the official runs, so fp16 ties may differ).
    """
    n = attn.shape[-1]
    k = min(n, int(n * top_ratio)) if top_ratio > 0 else 0
    if top_ratio > 0:
        k = max(k, 1)
    mask = torch.zeros_like(attn, dtype=torch.bool)
    if k:
        mask.scatter_(-1, attn.topk(k, dim=-1).indices, True)
    return mask


def iqr_outliers(attn: torch.Tensor, whisker: float = 1.5) -> torch.Tensor:
    """Bool (batch, N): values above Q3 + whisker * (Q3 - Q1) of their row.

    Official: ``np.percentile`` (linear) of the map in its own dtype and ``attn > Q3 + 1.5 IQR``
    (clip_encoder.py:16-29), then ``topk(bottom_attn, n_outliers)`` (clip_encoder.py:48), which
    selects exactly those outliers (values above a bound are a top set). Same arithmetic here.
    """
    rows = attn.detach().cpu()
    rows = (rows.float() if rows.dtype == torch.bfloat16 else rows).numpy()
    out = np.zeros(rows.shape, dtype=bool)
    for b, x in enumerate(rows):
        q1, q3 = np.percentile(x, 25), np.percentile(x, 75)
        out[b] = x > q3 + whisker * (q3 - q1)
    return torch.from_numpy(out).to(attn.device)


def spatial_grid(grid_h: int, grid_w: int, ratio: float) -> torch.Tensor:
    """Bool (grid_h * grid_w,): the centre patch of each cell of an m x m partition of the grid,
    m = max(1, round(sqrt(ratio * N))) clipped to the grid (see the module docstring); empty for ratio 0."""
    mask = torch.zeros(grid_h * grid_w, dtype=torch.bool)
    if ratio <= 0:
        return mask
    m = max(1, round(math.sqrt(ratio * grid_h * grid_w)))
    m_h, m_w = min(m, grid_h), min(m, grid_w)
    rows = [(i * grid_h // m_h + (i + 1) * grid_h // m_h - 1) // 2 for i in range(m_h)]
    cols = [(j * grid_w // m_w + (j + 1) * grid_w // m_w - 1) // 2 for j in range(m_w)]
    for r in rows:
        for c in cols:
            mask[r * grid_w + c] = True
    return mask


def spatial_official(
    layer_probs: torch.Tensor, n_patches: int, ratio: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Bool (batch, N+1): the official "spatial" tokens (clip_encoder.py:31-34, called at :41).

    The official code averages the local layer's full attention (CLS + N patches, both ways)
    over heads, sums each *row* and takes the top int(N * ratio) rows. A softmax row sums to 1,
    so these scores differ only by rounding: the choice is effectively arbitrary. The row
    index j (0 = CLS) is then used as a patch index (clip_encoder.py:46, attention.py:135), so
    row j boosts image token j, and j = N boosts the token right after the image. The
    committed call passes no ratio (0: no spatial tokens) and chair_eval.py's ``--spatial`` is
    parsed but never used (chair_eval.py:56, only in the file name at :85); the repository's
    ``*_spatial_0.05`` results therefore came from an edited ratio.

    layer_probs: (batch, heads, N+1, N+1) probabilities of the local layer.
    """
    scores = spatial_row_sums(layer_probs, dtype)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    k = int(n_patches * ratio)
    if k:
        mask.scatter_(-1, scores.topk(k, dim=-1).indices, True)
    return mask


def spatial_row_sums(layer_probs: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(batch, N+1) scores ``spatial_official`` ranks: the head-mean attention's row sums (clip_encoder.py:31-32)."""
    return layer_probs.to(dtype).mean(dim=1).sum(dim=-1)


@dataclasses.dataclass
class TokenSelection:
    """Disjoint bool masks (batch, K) over the vision tower's patches, row-major on the grid.

    K = N patches; K = N+1 with the official spatial variant, whose index N is the token
    right after the image (see ``spatial_official``).
    """

    local: torch.Tensor
    summary: torch.Tensor
    spatial: torch.Tensor
    grid: tuple[int, int]

    def counts(self) -> dict:
        return {k: getattr(self, k).sum(-1).tolist() for k in ("local", "summary", "spatial")}


def select_tokens(
    local_attn: torch.Tensor,
    summary_attn: torch.Tensor,
    grid: tuple[int, int],
    top_ratio: float,
    spatial_ratio: float,
    official_spatial: torch.Tensor | None = None,
) -> TokenSelection:
    """PAINT's selection for every item of a batch: summary = IQR outliers of ``summary_attn``;
    local = top ``top_ratio`` of ``local_attn`` minus summary; spatial = the grid lattice (or
    ``official_spatial``, a (batch, N+1) mask from ``spatial_official``) minus both.

    Official: local = (top 25% | spatial) - summary (clip_encoder.py:46-55); the margins are
    the same as ours (alpha on local and spatial, beta on summary), so the split between local
    and spatial is only bookkeeping.
    """
    n = grid[0] * grid[1]
    if local_attn.shape[-1] != n or summary_attn.shape[-1] != n:
        raise ValueError(f"attention maps have {local_attn.shape[-1]} patches; the grid {grid} has {n}")
    summary = iqr_outliers(summary_attn)
    local = select_local(local_attn, top_ratio) & ~summary
    if official_spatial is None:
        spatial = spatial_grid(*grid, spatial_ratio).to(local.device).expand_as(local)
    else:
        summary, local = (torch.nn.functional.pad(m, (0, 1)) for m in (summary, local))
        spatial = official_spatial.to(local.device)
    return TokenSelection(local=local, summary=summary, spatial=spatial & ~summary & ~local, grid=grid)


class ReceivedCapture(hooks.Capture):
    """A ``Capture`` that keeps, per forward call, only ``received_attention`` of the site
    ((batch, keys) in ``maps[layer]``), not the maps themselves."""

    def observe(self, probs, layer):
        self.maps.setdefault(layer, []).append(received_attention(probs))


class TokenSelector:
    """Records the CLS rows of the vision tower and turns them into a ``TokenSelection``.

    ``source="received"``: records ``received_attention`` instead (``ReceivedCapture``), over
    patch queries (rows 1..) and patch keys (keys 1..): the CLS token is left out.

    ``captures`` are the vision-tower edits to install (the CLS rows of the local and summary
    layers; with the official spatial variant also every row of the local layer);
    ``current()`` is called by the language-model edit and recomputes the selection once per
    vision-tower pass. ``dtype``: the precision of the selection arithmetic (see
    methods/paint.py ``SELECTION_PRECISIONS``).
    """

    def __init__(
        self,
        local_layer: int,
        summary_layer: int,
        grid: tuple[int, int],
        top_ratio: float,
        spatial_ratio: float,
        spatial: str = "grid",
        dtype: torch.dtype = torch.float32,
        source: str = "cls",
    ):
        self.local_layer, self.summary_layer = local_layer, summary_layer
        self.grid, self.top_ratio, self.spatial_ratio, self.dtype = grid, top_ratio, spatial_ratio, dtype
        self.source = source
        layers = sorted({local_layer, summary_layer})
        if source == "received":
            self.capture = ReceivedCapture(tower="vision", layers=layers, rows=hooks.Rows.span(1), keys=slice(1, None))
        else:
            self.capture = hooks.Capture(tower="vision", layers=layers, rows=hooks.Rows.span(0, 1), keys=slice(1, None))
        self.captures = [self.capture]
        self.full_capture = None  # every row of the local layer, for the official spatial variant
        if spatial == "official" and official_spatial_count(grid, spatial_ratio):
            self.full_capture = hooks.Capture(tower="vision", layers=[local_layer], rows=hooks.Rows.all())
            self.captures.append(self.full_capture)
        self._done = 0  # vision-tower passes already turned into a selection
        self.selection: TokenSelection | None = None
        self.crop: int | None = None  # anyres: the tower runs on base + tiles as a batch; select from this crop

    @property
    def width(self) -> int:
        """How many key slots the selection covers: N patches (+1 with the official spatial variant)."""
        return self.grid[0] * self.grid[1] + (self.full_capture is not None)

    def current(self) -> TokenSelection:
        passes = len(self.capture.maps.get(self.summary_layer, []))
        if passes == 0:
            raise RequestError(
                "PAINT: the vision tower did not run before the language model in this request "
                "(pass pixel_values, not inputs_embeds); the token selection needs its "
                + ("CLS attention" if self.source == "cls" else "attention")
            )
        if passes != self._done:
            maps = self.capture.latest()
            if self.crop is not None:
                maps = {layer: m[self.crop : self.crop + 1] for layer, m in maps.items()}
            official_spatial = None
            if self.full_capture is not None:
                full = self.full_capture.latest()[self.local_layer]
                official_spatial = spatial_official(full, self.grid[0] * self.grid[1], self.spatial_ratio, self.dtype)
            self.selection = select_tokens(
                self._scores(maps[self.local_layer]),
                self._scores(maps[self.summary_layer]),
                self.grid,
                self.top_ratio,
                self.spatial_ratio,
                official_spatial,
            )
            self._done = passes
        return self.selection

    def _scores(self, captured: torch.Tensor) -> torch.Tensor:
        """(batch, patches) per-patch scores of one captured layer: the CLS row summed over heads, or
        (``received``) what ReceivedCapture already reduced."""
        return cls_attention(captured, self.dtype) if self.source == "cls" else captured


def official_spatial_count(grid: tuple[int, int], ratio: float) -> int:
    """int(N * ratio): how many rows the official spatial variant picks (clip_encoder.py:33)."""
    return int(grid[0] * grid[1] * ratio)
