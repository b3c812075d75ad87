"""The keyword a model's forward and ``generate`` take a KV cache by, and read it back from their outputs.

transformers 5.x renamed ``past_key_values`` to ``cache``, as an argument and as an output field (5.24, the
pinned version, has both);
the models' forward drops the old argument in 5.40 (``@deprecate_kwarg("past_key_values", "5.40.0",
new_name="cache")``, e.g. models/llava/modeling_llava.py) and ``generate`` in 6.0. Older releases know only
``past_key_values``, and a ``cache=`` would vanish into the forward's ``**kwargs`` unread. Every
technique that hands a model a cache of its own (PM, re-prompting, image-free guidance) goes through here.
"""

from __future__ import annotations

import transformers
from packaging.version import Version

CACHE_KEY = "cache" if Version(transformers.__version__) >= Version("5.24.0") else "past_key_values"


def with_cache(cache) -> dict:
    """The keyword argument that hands ``cache`` to a forward or ``generate``: ``**with_cache(cache)``."""
    return {CACHE_KEY: cache}


def cache_of(out):
    """The KV cache a forward (``use_cache=True``) or ``generate(return_dict_in_generate=True)`` returned."""
    return getattr(out, CACHE_KEY)


def full_cache():
    """A cache whose every layer keeps every entry, for a prefill whose cache is then cut by position.
    A model with sliding-window layers (Gemma 3) would otherwise give those layers a cache that keeps
    only its window; the window itself stays in the attention mask, built from positions."""
    from transformers import DynamicCache

    return DynamicCache()
