"""The shared attention hook layer: one attention function, edits described as data.

Every technique in this project changes or reads attention through this module and
nothing else. The design follows transformers' ``AttentionInterface``: we register one
attention function per base implementation (``hooked_sdpa``, ``hooked_eager``) plus the
matching mask function. When no edit targets a layer, the function calls the base
implementation with the same arguments, so an installed but idle hook layer is
bit-identical to the plain model.

Edits are small objects naming *where* they act (tower, layers, heads, query rows,
key columns) and *what* they do to the pre-softmax scores (``edit_scores``) or what they
record from the post-softmax probabilities (``observe``). They are installed for the
duration of a ``with edited(model, *edits):`` block and always removed afterwards, even
when the forward raises (like TransformerLens' ``run_with_hooks``).

Only the query rows that some edit touches are recomputed eagerly, from q and K
directly: capturing the last row over the image tokens costs O(heads x keys) per layer,
not the O(heads x n^2) of ``output_attentions=True``.

Positions are absolute token positions of the full sequence (prompt + generated), so one
edit works unchanged in the prefill and in every KV-cache decode step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Iterable, Sequence

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

HOOKED_PREFIX = "hooked_"
EDITS_ATTR = "_lmms_plugins_edits"  # set on an attention module only while edits are installed
TOWERS = ("lm", "vision")

# ---------------------------------------------------------------------------------------
# Where an edit acts
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rows:
    """Query rows, in absolute positions of the full sequence.

    ``Rows.last()`` is the newest query row of each forward (the last prompt token in the
    prefill, the new token in each decode step); ``Rows.span(a, b)`` the positions
    a <= p < b (b=None: open-ended, i.e. also every later generated token).
    """

    start: int | None = None
    stop: int | None = None
    last_only: bool = False

    @staticmethod
    def last() -> "Rows":
        return Rows(last_only=True)

    @staticmethod
    def span(start: int = 0, stop: int | None = None) -> "Rows":
        return Rows(start=start, stop=stop)

    @staticmethod
    def all() -> "Rows":
        return Rows(start=0)

    def shifted(self, offset: int) -> "Rows":
        """The same rows ``offset`` positions later (a left-padded batch row); the last row stays the last."""
        if self.last_only:
            return self
        return Rows(start=(self.start or 0) + offset, stop=None if self.stop is None else self.stop + offset)

    def local(self, q_len: int, k_len: int) -> torch.Tensor:
        """Indices (into this forward's query block) of the selected rows."""
        if self.last_only:
            return torch.tensor([q_len - 1])
        first = k_len - q_len  # absolute position of query row 0 (cache length)
        lo = max(self.start or 0, first)
        hi = k_len if self.stop is None else min(self.stop, k_len)
        return torch.arange(lo - first, max(hi, lo) - first)


KeySpec = slice | Sequence[int] | torch.Tensor


def shift_keys(keys: KeySpec, offset: int) -> KeySpec:
    """Key positions ``offset`` later (a left-padded batch row); ``slice(None)`` (every key) starts at ``offset``,
    so the padding stays out of the site as it is out of the request alone."""
    if isinstance(keys, slice):
        if (keys.start or 0) < 0 or (keys.stop or 0) < 0 or keys.step not in (None, 1):
            raise ValueError(f"cannot place keys {keys} in a batch row: negative or strided slice")
        return slice((keys.start or 0) + offset, None if keys.stop is None else keys.stop + offset)
    return torch.as_tensor(keys, dtype=torch.long) + offset


def key_index(keys: KeySpec, k_len: int, device) -> torch.Tensor:
    """Absolute key positions selected by ``keys`` that exist in this forward."""
    if isinstance(keys, slice):
        return torch.arange(k_len, device=device)[keys]
    idx = torch.as_tensor(keys, dtype=torch.long, device=device).flatten()
    return idx[idx < k_len]


@dataclasses.dataclass
class AttnEdit:
    """Base of every edit. Subclasses override ``edit_scores`` and/or ``observe``.

    tower: "lm" (the language model) or "vision" (the vision tower);
    layers: 0-based layer indices of that tower;
    rows: query rows (``Rows``); keys: key positions (slice, list or tensor);
    heads: query-head indices, or None for all heads;
    batch: the batch rows it acts on, or None for every row (``place``: one request of a batch).
    """

    layers: Sequence[int]
    rows: Rows = dataclasses.field(default_factory=Rows.last)
    keys: KeySpec = dataclasses.field(default_factory=lambda: slice(None))
    heads: Sequence[int] | None = None
    tower: str = "lm"
    batch: Sequence[int] | None = None

    changes_scores = False  # True for edits whose edit_scores is not the identity

    def place(self, batch: Sequence[int], offset: int) -> None:
        """Move this edit, built for one request alone, to its rows of a batch: batch rows ``batch``, and
        every position ``offset`` later (the request's left padding). In place, so that objects holding the
        edit (PAINT's selector holds its capture) keep seeing it. Subclasses with positions of their own
        shift them too (``shift_positions``)."""
        self.batch = list(batch)
        if offset:
            self.rows = self.rows.shifted(offset)
            self.keys = shift_keys(self.keys, offset)

    def edit_scores(self, scores: torch.Tensor, layer: int) -> torch.Tensor:
        """scores: (batch, heads, rows, keys) pre-softmax, restricted to this edit's site."""
        return scores

    def observe(self, probs: torch.Tensor, layer: int) -> None:
        """probs: (batch, heads, rows, keys) post-softmax, restricted to this edit's site."""

    def describe(self) -> dict:
        """A printable recipe entry (logged with results)."""
        out = {"edit": type(self).__name__, "tower": self.tower, "layers": _compact(self.layers)}
        for f in dataclasses.fields(self):
            if f.name in ("layers", "tower") or (f.name == "batch" and self.batch is None):
                continue
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = _compact(v.flatten().tolist()) if v.numel() > 1 else v.item()
            elif isinstance(v, slice):
                v = f"{v.start}:{v.stop}"
            elif isinstance(v, (list, tuple)) and len(v) > 8:
                v = _compact(v)
            elif isinstance(v, dict):
                continue  # recorded data, not configuration
            out[f.name] = v if not isinstance(v, Rows) else dataclasses.asdict(v)
        return out


def _compact(xs) -> str:
    xs = list(xs)
    if xs and xs == list(range(xs[0], xs[0] + len(xs))):
        return f"{xs[0]}..{xs[-1]}"
    return ",".join(map(str, xs))


@dataclasses.dataclass
class Boost(AttnEdit):
    """a + alpha * |a| on the site (PAI, PAINT). alpha: a number, or one per selected head."""

    alpha: float | torch.Tensor = 0.0
    changes_scores = True

    def edit_scores(self, scores, layer):
        alpha = self.alpha
        if isinstance(alpha, torch.Tensor):
            alpha = alpha.to(scores.device, scores.dtype).view(1, -1, 1, 1)
        # a masked key (-inf: causal, padding, sliding window) stays masked: -inf + alpha*inf would be NaN
        return torch.where(torch.isinf(scores), scores, scores + alpha * scores.abs())


@dataclasses.dataclass
class Block(AttnEdit):
    """Remove the site's keys from the softmax (-inf): knockout, token masking, pruning."""

    changes_scores = True

    def edit_scores(self, scores, layer):
        return scores.masked_fill(torch.ones_like(scores, dtype=torch.bool), float("-inf"))


@dataclasses.dataclass
class Capture(AttnEdit):
    """Record the attention probabilities of the site, per layer and per forward call.

    ``maps[layer]`` is a list with one (batch, heads, rows, keys) float32 tensor per
    forward call (prefill first, then one per decode step).
    """

    maps: dict = dataclasses.field(default_factory=dict)

    def observe(self, probs, layer):
        self.maps.setdefault(layer, []).append(probs.detach().float())

    def latest(self) -> dict[int, torch.Tensor]:
        """The most recent map of every captured layer."""
        return {layer: ms[-1] for layer, ms in self.maps.items()}

    def stacked(self, call: int = -1) -> torch.Tensor:
        """(layers, batch, heads, rows, keys) for one forward call, layers in ascending order."""
        return torch.stack([self.maps[layer][call] for layer in sorted(self.maps)])


# ---------------------------------------------------------------------------------------
# The attention function
# ---------------------------------------------------------------------------------------


def _module_eager(module):
    """The eager function of the module's own modeling file (CLIP's differs from Llama's)."""
    return sys.modules[type(module).__module__].eager_attention_forward


def _additive_mask(attention_mask, module, rows, q_len, k_len, dtype, device):
    """(batch|1, heads|1, len(rows), k_len) additive mask for the selected query rows."""
    if attention_mask is None:
        if not getattr(module, "is_causal", False):
            return None
        q_pos = (k_len - q_len + rows.to(device))[:, None]
        allowed = torch.arange(k_len, device=device)[None, :] <= q_pos
        return torch.zeros((), dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))[None, None]
    m = attention_mask[:, :, rows.to(attention_mask.device), :k_len]
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, float("-inf"))
    return m.to(dtype)


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, R, X) -> (B, kv_heads, H/kv_heads * R, X): query heads grouped by their kv head,
    so grouped-query attention needs no repeat_kv copy of the whole K and V."""
    b, h, r, d = x.shape
    return x.reshape(b, kv_heads, (h // kv_heads) * r, d)


def _edited_attention(module, query, key, value, attention_mask, scaling, edits, layer, base_out):
    """Recompute the rows that the edits touch; return the (possibly) edited output."""
    q_len, k_len = query.shape[2], key.shape[2]
    dev = query.device
    # Rows, keys, heads and batch rows per edit, in this forward's coordinates.
    sites = []
    for e in edits:
        rows = e.rows.local(q_len, k_len).to(dev)
        if rows.numel() == 0:
            continue
        keys = key_index(e.keys, k_len, dev)
        heads = None if e.heads is None else torch.as_tensor(e.heads, device=dev)
        batch = None if e.batch is None else torch.as_tensor(e.batch, device=dev)
        sites.append((e, rows, keys, heads, batch))
    if not sites:
        return base_out
    if len(sites) == 1:
        rows = sites[0][1]
    else:
        rows = torch.unique(torch.cat([site[1] for site in sites]))  # sorted union
    pos_in_rows = torch.full((q_len,), -1, dtype=torch.long, device=dev)
    pos_in_rows[rows] = torch.arange(rows.numel(), device=dev)

    b, h, kv = query.shape[0], query.shape[1], key.shape[1]
    q_rows = query[:, :, rows]
    scores = (_grouped(q_rows, kv) @ key.transpose(2, 3)).view(b, h, rows.numel(), k_len) * scaling
    mask = _additive_mask(attention_mask, module, rows, q_len, k_len, scores.dtype, scores.device)
    if mask is not None:
        scores = scores + mask
    changed = torch.zeros(b, rows.numel(), dtype=torch.bool, device=dev)  # (batch row, row) pairs an edit changed
    for e, r, keys, heads, batch in sites:
        if not e.changes_scores:
            continue
        ri = pos_in_rows[r]
        if heads is None and batch is None:
            new = e.edit_scores(scores[:, :, ri][:, :, :, keys], layer)
            scores[:, :, ri[:, None], keys[None, :]] = new
            changed[:, ri] = True
            continue
        bi = torch.arange(b, device=dev) if batch is None else batch
        hi = torch.arange(h, device=dev) if heads is None else heads
        site = (bi[:, None, None, None], hi[None, :, None, None], ri[None, None, :, None], keys[None, None, None, :])
        scores[site] = e.edit_scores(scores[site], layer)
        changed[bi[:, None], ri[None, :]] = True
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    for e, r, keys, heads, batch in sites:
        if type(e).observe is AttnEdit.observe:
            continue
        sub = probs[:, :, pos_in_rows[r]][:, :, :, keys]
        sub = sub if heads is None else sub[:, heads]
        e.observe(sub if batch is None else sub[batch], layer)
    touched = changed.any(0)
    if not bool(touched.any()):
        return base_out  # observation only: the output stays the base implementation's
    out, weights = base_out
    p = probs[:, :, touched].to(value.dtype)
    new_rows = (_grouped(p, kv) @ value).view(b, h, p.shape[2], value.shape[-1]).transpose(1, 2).to(out.dtype)
    out = out.clone()
    target = rows[touched]
    which = changed[:, touched]
    if bool(which.all()):
        out[:, target] = new_rows
    else:  # a batch: each request's rows change only where its own edits act (its padding rows stay as they were)
        out[:, target] = torch.where(which[:, :, None, None], new_rows, out[:, target])
    return out, weights


def _make_attention(base_name: str):
    def hooked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        base = sdpa_attention_forward if base_name == "sdpa" else _module_eager(module)
        out = base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        installed = getattr(module, EDITS_ATTR, None)
        if not installed:
            return out
        layer, edits = installed
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return _edited_attention(module, query, key, value, attention_mask, scale, edits, layer, out)

    hooked_attention.__name__ = f"hooked_{base_name}_attention"
    return hooked_attention


_BASES = {"sdpa": sdpa_mask, "eager": eager_mask}
for _name, _mask in _BASES.items():
    AttentionInterface.register(HOOKED_PREFIX + _name, _make_attention(_name))
    AttentionMaskInterface.register(HOOKED_PREFIX + _name, _mask)


# ---------------------------------------------------------------------------------------
# Installing and scoping
# ---------------------------------------------------------------------------------------


def install(model) -> str:
    """Switch ``model`` (and its sub-models) to the hooked twin of its attention implementation.

    Idempotent. Returns the implementation name now in use. Only ``sdpa`` and ``eager``
    have hooked twins; other implementations (flash attention) are refused with a message.
    """
    current = model.config._attn_implementation or "eager"
    if current.startswith(HOOKED_PREFIX):
        return current
    if current not in _BASES:
        raise ValueError(
            f"attn_implementation={current!r} cannot be hooked; use attn_implementation=sdpa (default) or eager"
        )
    model.set_attn_implementation(HOOKED_PREFIX + current)
    return HOOKED_PREFIX + current


def _attention_recorders(model) -> list[tuple[type | None, str | None, str | None]]:
    """(class, layer name, class-name suffix) of every module that transformers itself records as
    "attentions" (``output_attentions``), from each sub-model's ``_can_record_outputs``: the modeling
    code's own declaration of its attention modules, i.e. the modules whose forward calls the
    ``AttentionInterface`` registry. Pooling heads built on ``nn.MultiheadAttention`` (SigLIP's) are not
    declared, and so are not found."""
    found = []
    for mod in model.modules():
        spec = (getattr(type(mod), "_can_record_outputs", None) or {}).get("attentions")
        for rec in spec if isinstance(spec, (list, tuple)) else [spec]:
            if rec is None:
                continue
            if isinstance(rec, type):
                found.append((rec, None, None))
            elif isinstance(rec, str):  # a class name (LLaVA-OneVision declares its LM's this way)
                found.append((None, None, rec))
            else:  # transformers' OutputRecorder
                found.append((rec.target_class, rec.layer_name, rec.class_name))
    return list(dict.fromkeys(found))


def _recorded(name: str, mod, recorders) -> bool:
    for cls, layer_name, class_name in recorders:
        if cls is not None and not isinstance(mod, cls):
            continue
        if class_name and not type(mod).__name__.endswith(class_name):
            continue
        if layer_name and layer_name not in name:
            continue
        return True
    return False


def _sub_configs(model) -> dict[str, list]:
    """The model's language and vision sub-configs (a plain LM: its own config is the language one)."""
    config = model.config
    text = [
        c
        for c in (getattr(config, "text_config", None), getattr(config, "get_text_config", lambda: None)())
        if c is not None
    ]
    vision = [c for c in (getattr(config, "vision_config", None),) if c is not None]
    return {"lm": text or [config], "vision": vision}


def _tower_of(mod_config, sub: dict) -> str | None:
    for tower, configs in sub.items():
        if any(mod_config is c for c in configs):
            return tower
    for tower, configs in sub.items():  # a copied config: same sub-model type
        if any(type(mod_config) is type(c) for c in configs):
            return tower
    return None


def attention_modules(model) -> dict[str, list[torch.nn.Module]]:
    """The attention modules of the language model ("lm") and vision tower ("vision"), in layer order.

    No per-family name patterns: an attention module is one the modeling code declares as recording
    "attentions" (``_attention_recorders``), and its tower is the sub-config it was built from
    (``config.text_config`` or ``config.vision_config``). This finds LLaVA-1.5/NeXT (CLIP + Llama),
    OneVision (SigLIP + Qwen2) and Qwen2.5-VL (fused-qkv windowed vision attention + Qwen2 LM) alike."""
    recorders = _attention_recorders(model)
    if not recorders:
        raise ValueError(
            f"{type(model).__name__} declares no attention modules (no _can_record_outputs['attentions'] in "
            "any sub-model): the hook layer needs a transformers 5 model class"
        )
    found = {t: [] for t in TOWERS}
    names = {t: [] for t in TOWERS}
    sub = _sub_configs(model)
    for name, mod in model.named_modules():
        if not _recorded(name, mod, recorders):
            continue
        tower = _tower_of(getattr(mod, "config", None), sub)
        if tower is not None:
            found[tower].append(mod)
            names[tower].append(name)
    for tower in TOWERS:
        _check_every_layer_routed(model, tower, names[tower])
    return found


class UnroutedLayers(ValueError):
    """Some layers of a tower mix tokens without ``AttentionInterface`` (linear attention, state-space
    layers): edits there would be silent no-ops, and layer numbers would skip them."""


def _check_every_layer_routed(model, tower: str, names: list[str]) -> None:
    """Refuse a tower whose layer stack has layers without a found attention module.

    Techniques number layers 0..n-1 as the list of attention modules; in a hybrid stack (Qwen3.5's
    Gated DeltaNet layers between full-attention ones) that list skips layers, so "layer 12" would be
    another layer and the skipped ones could not be edited at all. The stack is the ``ModuleList`` that
    holds the attention modules (``...layers.<i>.self_attn``)."""
    stacks: dict[str, set[int]] = {}
    for name in names:
        parts = name.split(".")
        at = max((i for i, p in enumerate(parts) if p.isdigit()), default=None)
        if at is None:
            continue
        stacks.setdefault(".".join(parts[:at]), set()).add(int(parts[at]))
    for stack_name, indices in stacks.items():
        stack = model.get_submodule(stack_name)
        missing = [i for i in range(len(stack)) if i not in indices]
        if not missing:
            continue
        mixers = sorted({_mixer_text(stack[i]) for i in missing})
        raise UnroutedLayers(
            f"{tower} layers {_compact(missing)} of {len(stack)} in {type(model).__name__} ({'; '.join(mixers)}) do not "
            "route their token mixing through transformers' AttentionInterface, so the hook layer can neither edit nor "
            "read them (an edit would be a silent no-op, and layer numbers would skip them); the techniques here need "
            "every layer to be softmax attention"
        )


def _mixer_text(layer: torch.nn.Module) -> str:
    """A layer's type and its token mixer's (the children that are not norms or MLPs)."""
    kids = [
        f"{n}: {type(c).__name__}"
        for n, c in layer.named_children()
        if not any(w in type(c).__name__.lower() for w in ("norm", "mlp", "moe", "dropout"))
    ]
    return f"{type(layer).__name__} with {', '.join(kids)}" if kids else type(layer).__name__


@contextlib.contextmanager
def edited(model, *edits: AttnEdit, modules: dict | None = None):
    """Install ``edits`` for the duration of the block; always removed afterwards.

    Nested blocks add to each other. Raises if an edit names a layer the model lacks.
    """
    install(model)
    modules = modules or attention_modules(model)
    by_module: dict[int, tuple[torch.nn.Module, int, list[AttnEdit]]] = {}
    for e in edits:
        if e.tower not in TOWERS:
            raise ValueError(f"unknown tower {e.tower!r}; use one of {TOWERS}")
        mods = modules[e.tower]
        for layer in e.layers:
            if not 0 <= layer < len(mods):
                raise ValueError(
                    f"{type(e).__name__} targets {e.tower} layer {layer}, but the model has layers 0..{len(mods) - 1}"
                )
            entry = by_module.setdefault(id(mods[layer]), (mods[layer], layer, []))
            entry[2].append(e)
    previous = []
    try:
        for mod, layer, es in by_module.values():
            old = getattr(mod, EDITS_ATTR, None)
            previous.append((mod, old))
            setattr(mod, EDITS_ATTR, (layer, (old[1] if old else []) + es))
        yield edits
    finally:
        for mod, old in reversed(previous):
            if old is None:
                mod.__dict__.pop(EDITS_ATTR, None)
            else:
                setattr(mod, EDITS_ATTR, old)


@contextlib.contextmanager
def without_edits(model):
    """Suspend every installed edit of ``model`` inside the block (e.g. for an image-free
    guidance pass, whose positions do not match the edits' positions)."""
    saved = [(m, m.__dict__.pop(EDITS_ATTR)) for m in model.modules() if EDITS_ATTR in m.__dict__]
    try:
        yield
    finally:
        for m, v in saved:
            setattr(m, EDITS_ATTR, v)


def num_layers(model, tower: str = "lm") -> int:
    return len(attention_modules(model)[tower])


def image_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Absolute positions of the image tokens in one prompt (batch item 0)."""
    return (input_ids[0] == image_token_id).nonzero().flatten()


def describe(edits: Iterable[AttnEdit]) -> list[dict]:
    return [e.describe() for e in edits]
