"""`llava_pai`: PAI's image-token boost (methods/pai.py) inside lmms-eval's llava_hf."""

import dataclasses

from methods.hooks import num_layers
from methods.pai import DEFAULTS, Pai

from ..base import TechniqueSpec, wrapper_classes
from methods.params import Param

# The layer window and the image-free guidance, shared with llava_paint (CFG off by default there).
WINDOW_AND_CFG_PARAMS = (
    Param("start_layer", int, DEFAULTS["start_layer"], "first edited language-model layer (0-based)"),
    Param("end_layer", int, None, "one past the last edited layer (default: the model's depth)", optional=True),
    Param("use_cfg", bool, False, "classifier-free guidance against an image-free pass"),
    Param(
        "gamma",
        float,
        DEFAULTS["gamma"],
        "guidance strength: gamma*(c-u)+u on log-probabilities (1: no guidance)",
        low=0.0,
    ),
    Param(
        "cutoff",
        float,
        DEFAULTS["cutoff"],
        "plausibility cutoff (fraction of the top token's probability)",
        low=0.0,
        high=1.0,
    ),
    Param(
        "boost_first_step",
        bool,
        DEFAULTS["boost_first_step"],
        "with CFG, boost the first answer token too (official: no)",
    ),
    Param(
        "official_quirks",
        bool,
        DEFAULTS["official_quirks"],
        "reproduce the official code's beam/gamma=1 behaviours (image-free cache not following beams; no boost at gamma 1)",
    ),
)

PARAMS = (
    Param("alpha", float, DEFAULTS["alpha"], "boost: a + alpha*|a| on image-token scores", low=0.0),
    Param(
        "newlines",
        bool,
        DEFAULTS["newlines"],
        "LLaVA-NeXT/OneVision: boost the high-res row-newline tokens too (default: grid tokens of every block only)",
    ),
    # PAI's own default follows the official scripts: CFG on (README.md:65,82 --use-cfg)
    *(dataclasses.replace(p, default=DEFAULTS["use_cfg"]) if p.name == "use_cfg" else p for p in WINDOW_AND_CFG_PARAMS),
)

# What the official code (LALBJ/PAI @ 9bbd8bd) runs for LLaVA-1.5; docs/pai.md has the parity table.
OFFICIAL = {
    "alpha": 0.2,  # README.md:65,82 --alpha 0.2 (= pope_eval.py:50, chair_eval.py:50 argparse default)
    "start_layer": 2,  # README.md:65 --start-layer 2 (pope_eval.py:54)
    "end_layer": None,  # README.md:65 --end-layer 32: the depth of LLaVA-1.5-7B (pope_eval.py:55)
    "use_cfg": True,  # README.md:65,68,82 --use-cfg
    "gamma": 1.1,  # README.md:65,82 --gamma 1.1 (the argparse default, pope_eval.py:53, is 2)
    "cutoff": 0.1,  # CFG.py:53
    "boost_first_step": False,  # attention.py:90,125: llama_modify(use_cfg=True) turns the boost off for the prefill
    "official_quirks": True,  # CFG.py:43-47 (beam cache) and CFG.py:30-31 (gamma 1)
}

SPEC = TechniqueSpec(
    name="llava_pai",
    params=PARAMS,
    build=lambda p, model: Pai(num_layers(model), **{k: p[k] for k in DEFAULTS}),
    presets={
        # pope_eval.py:69 / chair_eval.py:69 call LLaVA-1.5's CLIPImageProcessor (transformers 4.37: PIL) on the image
        "official": {**OFFICIAL, "image_backend": "pil"},
        # the paper's settings are the official scripts' (README.md:65,82); without the two quirks (docs/pai.md)
        "paper": {**OFFICIAL, "official_quirks": False, "image_backend": "pil"},
    },
    doc="PAI: boost attention to all image tokens on the answer rows (optionally with image-free CFG).",
)

LlavaPai, LlavaPaiChat = wrapper_classes(SPEC, __name__)
