"""`llava_pai`: PAI's image-token boost (methods/pai.py) inside lmms-eval's llava_hf."""

from methods.hooks import num_layers
from methods.pai import DEFAULTS, Pai

from ..base import TechniqueSpec, wrapper_classes
from ..params import Param

# The layer window and the image-free guidance, shared with llava_paint.
WINDOW_AND_CFG_PARAMS = (
    Param("start_layer", int, DEFAULTS["start_layer"], "first edited language-model layer (0-based)"),
    Param("end_layer", int, None, "one past the last edited layer (default: the model's depth)", optional=True),
    Param("use_cfg", bool, DEFAULTS["use_cfg"], "classifier-free guidance against an image-free pass"),
    Param("gamma", float, DEFAULTS["gamma"], "guidance strength", low=0.0),
    Param("cutoff", float, DEFAULTS["cutoff"], "plausibility cutoff (fraction of the top token's probability)", low=0.0, high=1.0),
)

PARAMS = (
    Param("alpha", float, DEFAULTS["alpha"], "boost: a + alpha*|a| on image-token scores", low=0.0),
    *WINDOW_AND_CFG_PARAMS,
)

SPEC = TechniqueSpec(
    name="llava_pai",
    params=PARAMS,
    build=lambda p, model: Pai(num_layers(model), **{k: p[k] for k in DEFAULTS}),
    presets={"paper": {"alpha": 0.2, "start_layer": 2, "end_layer": None, "use_cfg": True, "gamma": 1.1}},
    doc="PAI: boost attention to all image tokens on the answer rows (optionally with image-free CFG).",
)

LlavaPai, LlavaPaiChat = wrapper_classes(SPEC, __name__)
