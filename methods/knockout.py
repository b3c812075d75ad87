"""Attention knockout ("What's in the image?", Kaduri et al., CVPR 2025).

Block the attention from the image keys to a chosen set of query rows, in a window of
language-model layers, and see how the answers change. The prompt of one request is

    [prefix text][image tokens][query text ............ last prompt token][generated ...]
     0            img_start     img_end                  prompt_len - 1    prompt_len

and the query sets are (rows = absolute positions, the same in the prefill and in every
KV-cache decode step):

- ``generated``: the rows that produce the answer. By default (``last_row="generated"``)
  this is ``prompt_len - 1`` onwards: the row of the last prompt token is the one that
  predicts the first answer token, so for a one-word answer (POPE's yes/no) it is where the
  whole answer is computed. With ``last_row="query"`` the split follows token identity as in
  the paper: ``generated`` = rows >= prompt_len (the generated tokens themselves), and a
  one-token answer can then not be affected by a ``generated`` knockout at all.
- ``query``: the prompt text after the image, up to the boundary above;
- ``both``: query + generated = every row after the image;
- ``all``: every row from the first image token on, i.e. also the image tokens' attention
  to each other (the image tokens then attend to the text prefix only);
- ``block_query``: the official bidirectional knockout (vlm-interp ``modified_llava_files/modeling_llama.py``, ``LlamaAttention.forward``, the ``to_block_query`` branch):
  in the prompt, the text rows lose the image keys *and* the image rows lose every text key
  (the prefix before the image); decode rows keep everything (the image's cached K/V were
  still computed without the text).

Layers: a window [from_layer, to_layer) of 0-based language-model layers, or everything
outside it (``outside=True``). An empty window installs nothing: the baseline exactly.
Named windows (``window=``) are the official layer flags: ``after:L`` is
``layer_idx > L`` (``max_layer_for_i2t_attn=L``, the condition of every branch in ``LlamaAttention.forward``; ``after:-1``
is every layer, ``after:<depth>`` none) and ``not_4_to_20`` is ``layer_idx < 4 or > 20``
(the ``block_vis_to_*_not_between_layers_4_to_20`` branches).
"""

from __future__ import annotations

import contextlib

from . import hooks
from .technique import Request, RequestError, Technique

QUERY_SETS = ("generated", "query", "both", "all", "block_query")
# Image features a family adds to the hidden states of its first LM layers (Qwen3-VL's DeepStack): the
# knockout cuts attention edges only ("keep": the injected features stay in the image positions' own
# states, read wherever those keys are not blocked), or also switches the injection off ("drop").
INJECTION = ("keep", "drop")
LAST_ROW = ("generated", "query")
DEFAULTS = {
    "mode": "query",
    "from_layer": 0,
    "to_layer": None,
    "outside": False,
    "last_row": "generated",
    "window": None,
    "newlines": True,
}

# The official run_on_coco.py flags as (mode, last_row, window); min_token_for_i2t_attn_masking=1
# (run_on_coco.py argparse default 1) blocks decode steps only (``query_states.shape[-2] == 1``),
# i.e. last_row=query's "generated" rows. Branch names: LlamaAttention.forward in modeling_llama.py.
OFFICIAL_FLAGS = {
    "official": ("generated", "query", "after:-1"),  # run_on_coco.py max_layers_for_i2t_attn = [32, -1]: the -1 run
    "official_no_encoding": ("all", "query", "after:-1"),  # -min_token_for_i2t_attn_masking 0: the final else branch
    "official_block_query": ("block_query", "query", "after:-1"),  # -block_query: to_block_query
    "official_block_query_unidirection": ("query", "query", "after:-1"),  # to_block_query_unidirection
    "official_block_vis_to_all_from_layer": ("both", "query", "after:-1"),  # block_vis_to_all_from_layer
    "official_gen_not_4_to_20": ("generated", "query", "not_4_to_20"),  # block_vis_to_gen_not_between_layers_4_to_20
    "official_query_not_4_to_20": ("query", "query", "not_4_to_20"),  # block_vis_to_query_not_between_layers_4_to_20
    "official_all_not_4_to_20": ("both", "query", "not_4_to_20"),  # block_vis_to_all_not_between_layers_4_to_20
}


def named_window(window: str, n_layers: int) -> list[int]:
    """An official layer flag as 0-based layers: ``after:L`` = layer_idx > L; ``not_4_to_20`` = < 4 or > 20.

    modeling_llama.py LlamaAttention.forward: ``layer_idx > max_layer_for_i2t_attn`` and ``(layer_idx<4 or layer_idx>20)``.
    """
    if window == "not_4_to_20":
        return [l for l in range(n_layers) if l < 4 or l > 20]
    if window.startswith("after:"):
        try:
            last_free = int(window.split(":", 1)[1])
        except ValueError:
            last_free = None
        if last_free is not None:
            return [l for l in range(n_layers) if l > last_free]
    raise ValueError(f"knockout: window={window!r} is not 'after:L' (blocks layers > L) or 'not_4_to_20'")


def knockout_layers(from_layer: int, to_layer: int | None, n_layers: int, outside: bool = False) -> list[int]:
    """The blocked layers: [from_layer, to_layer) (or its complement), clipped to the model.

    Negative values count from the end; to_layer=None is the model's depth. An empty window
    (from_layer == to_layer) is allowed and blocks nothing (or everything, with outside=True).
    """
    start = from_layer + n_layers if from_layer < 0 else from_layer
    stop = n_layers if to_layer is None else (to_layer + n_layers if to_layer < 0 else to_layer)
    if not (0 <= start <= stop <= n_layers):
        raise ValueError(
            f"knockout: layer window [{from_layer}, {to_layer}) is outside the model's {n_layers} language-model "
            f"layers; choose 0 <= from_layer <= to_layer <= {n_layers}"
        )
    window = range(start, stop)
    return [l for l in range(n_layers) if l not in window] if outside else list(window)


def query_rows(mode: str, img_start: int, img_end: int, prompt_len: int, last_row: str = "generated") -> hooks.Rows:
    """The query rows of one knockout mode, as absolute positions (see the module docstring)."""
    if mode not in QUERY_SETS:
        raise ValueError(f"knockout: mode={mode!r} is not one of {', '.join(QUERY_SETS)}")
    if last_row not in LAST_ROW:
        raise ValueError(f"knockout: last_row={last_row!r} is not one of {', '.join(LAST_ROW)}")
    boundary = prompt_len - 1 if last_row == "generated" else prompt_len  # first "generated" row
    if mode == "block_query":
        return hooks.Rows.span(img_end, prompt_len)  # prompt rows only (``query_states.shape[-2] != 1``)
    if mode == "generated":
        return hooks.Rows.span(boundary)
    if mode == "query":
        return hooks.Rows.span(img_end, boundary)
    if mode == "both":
        return hooks.Rows.span(img_end)
    return hooks.Rows.span(img_start)


def blocked_pairs(mode, img_start, img_end, prompt_len, seq_len, last_row="generated") -> set[tuple[int, int]]:
    """Every (query row, image key) pair a knockout blocks, by plain enumeration (for checks and docs)."""
    rows = query_rows(mode, img_start, img_end, prompt_len, last_row)
    stop = seq_len if rows.stop is None else rows.stop
    return {(r, k) for r in range(rows.start, stop) for k in range(img_start, img_end) if k <= r}


class Knockout(Technique):
    """Block image keys for one query set in a layer window."""

    name = "knockout"
    batch_refused = None  # one pass; each request's blocked rows and keys placed in its batch row

    def __init__(self, n_layers: int, injection: str | None = None, **params):
        """injection: None (a family without per-layer image features) or one of INJECTION."""
        super().__init__(**{**DEFAULTS, **params})
        p = self.params
        if injection is not None and injection not in INJECTION:
            raise ValueError(f"knockout: injection={injection!r} is not one of {', '.join(INJECTION)}")
        self.injection = injection
        if p["mode"] not in QUERY_SETS:
            raise ValueError(f"knockout: mode={p['mode']!r} is not one of {', '.join(QUERY_SETS)}")
        if p["window"]:
            self.layers = named_window(p["window"], n_layers)
        else:
            self.layers = knockout_layers(p["from_layer"], p["to_layer"], n_layers, p["outside"])

    def recipe(self, model, req: Request) -> list[hooks.AttnEdit]:
        if not self.layers:
            return []  # empty window: the baseline, bit for bit
        img_start, img_end = int(req.image_pos[0]), int(req.image_pos[-1]) + 1
        # anyres row newlines are blocked by default: after layer 0 their states carry what they read from the image
        pos = req.image_keys(newlines=self.params["newlines"])
        if self.params["mode"] == "all" and img_start == 0:
            raise RequestError(
                "knockout mode=all needs at least one text token before the image (the image rows would have no key "
                "left to attend to); use mode=both"
            )
        rows = query_rows(self.params["mode"], img_start, img_end, req.prompt_len, self.params["last_row"])
        edits = [hooks.Block(layers=self.layers, rows=rows, keys=pos)]
        if self.params["mode"] == "block_query" and img_start > 0:
            # the other direction (``attn_weights[..., image_tokens_indices, blocked_query_index]``): image rows lose the text keys before them (later ones are causal)
            edits.append(
                hooks.Block(layers=self.layers, rows=hooks.Rows.span(img_start, img_end), keys=slice(0, img_start))
            )
        return edits

    def _injected(self, model, req: Request):
        """injection=drop: the family's per-layer image features off for this call (its adapter's ``injection_off``)."""
        return req.adapter.injection_off(model) if self.injection == "drop" else contextlib.nullcontext()

    def generate(self, model, req: Request, **kwargs):
        with self._injected(model, req):
            return super().generate(model, req, **kwargs)

    def forward(self, model, req: Request, **kwargs):
        with self._injected(model, req):
            return super().forward(model, req, **kwargs)

    def describe(self):
        extra = {} if self.injection is None else {"injection": self.injection}
        return {**super().describe(), "layers": hooks._compact(self.layers) if self.layers else "none", **extra}
