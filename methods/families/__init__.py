"""Model families as adapters: one module per family, the only code that knows one.

``adapter(config)`` returns the family's ``Family`` (methods/families/base.py says what it answers);
``image_geometry`` builds one image's blocks through it. Modules: ``llava`` (LLaVA-1.5),
``anyres`` (LLaVA-NeXT, LLaVA-OneVision), ``qwen2_5_vl`` (Qwen2.5-VL), ``gemma3`` (Gemma 3), ``internvl`` (InternVL, HF-native),
``qwen3_vl`` (Qwen3-VL, DeepStack). A new family is a new module here, imported below, with its tests and a row of the README's support matrix.
"""

from . import anyres, gemma3, internvl, llava, qwen2_5_vl, qwen3_vl  # noqa: F401  (registers the adapters)
from .base import ADAPTERS, Family, adapter, image_geometry, register, supported

# Every per-image processor output a forward over an image needs, over all families: pixel_values,
# then each family's layout inputs (anyres image_sizes, Qwen's image_grid_thw).
IMAGE_KEYS = ("pixel_values", *dict.fromkeys(k for f in ADAPTERS.values() for k in f.request_inputs))
# Every per-token processor output besides input_ids and attention_mask, over all families (Qwen's
# mm_token_type_ids for M-RoPE, Gemma 3's token_type_ids for its bidirectional image attention).
TOKEN_INPUTS = tuple(dict.fromkeys(k for f in ADAPTERS.values() for k in f.token_inputs))

__all__ = ["ADAPTERS", "IMAGE_KEYS", "TOKEN_INPUTS", "Family", "adapter", "image_geometry", "register", "supported"]
