"""Golden fixtures from the official PAINT code (hasanar1f/PAINT @ 2a9e8f8, ``modPAI/``).

Runs the official code, unmodified, on the LLaVA-1.5-shaped tiny model (bench/parity/tiny_llava15.py,
original layout) with fixed pixel tensors, in the official stack's venv (bench/parity/official_env.sh):

    bash bench/parity/regenerate.sh --paint /work/official/PAINT       # everything (PAI with --pai)

or by hand:

    python bench/parity/tiny_llava15.py /tmp/paint_parity/model                    # our venv
    /work/venvs/official/bin/python bench/parity/paint_official.py \\
        --official /work/official/PAINT --model /tmp/paint_parity/model --out tests/fixtures/official/paint

The checkout is a git clone at 2a9e8f8 or an exported tree (then PAINT_COMMIT=<full hash>, as
for the mirror export ``git -C <mirror> archive HEAD | tar -x -C /work/official/PAINT``).

What is called, all from the checkout: the fork's ``llava`` package (``LlavaLlamaForCausalLM``, whose
CLIP tower runs ``update_modpai_alpha`` inside its forward, clip_encoder.py:166-168),
``attention.llama_modify`` and ``CFG.CFGLogits``; the CFG prompt is built as
``ModelLoader.init_cfg_processor`` does (model_loader.py:270-292: BOS + the text before and after
the image). Fixed token ids replace the Vicuna tokenizer (not available here).

Observation only: ``update_modpai_alpha`` is wrapped to record its inputs (the CLIP attentions) and
outputs; a first logits processor records the raw conditional logits before ``CFGLogits``.

The runtime shim (``SHIM`` below, hashed into provenance.json): empty stand-ins for modules the
LLaVA-1.5 path never calls (matplotlib, imported by attention.py:9 for a plotting helper; the
InternViT / InternVL encoders imported by clip_encoder.py:10-13, which need timm and torchvision).
The official code itself runs in float32 on CPU (no ``.cuda()`` is on this path), plus one run of
the selection in float16 (the precision of the official runs) for the fp16 arithmetic.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import subprocess
import sys
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import tiny_llava15 as tiny  # noqa: E402

OFFICIAL_COMMIT = "2a9e8f821536531adcc03807f3850a3ab6231443"
N_IMAGES = 3
BEFORE, AFTER = [319, 1799, 2594], [3148, 1438, 29889, 319, 1799]  # fixed "text" ids around the image
PROMPTS = [(BEFORE, AFTER), ([450, 1967], [20355, 278, 1967, 29901])]
NEW_TOKENS = 4
TOP_LOGITS = 64


def shim() -> None:
    """Stand-ins for modules the LLaVA-1.5 path imports but never uses (see the module docstring)."""
    import transformers.models.llama.modeling_llama  # noqa: F401  (before the stand-ins: transformers probes packages)

    def stub(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        m.__path__ = []
        sys.modules[name] = m

    stub("matplotlib")
    stub("matplotlib.pyplot")
    enc = "llava.model.multimodal_encoder."
    for pkg, mods in {
        "intern_vit_6b": {"configuration_intern_vit": "InternVisionConfig", "modeling_intern_vit": "InternVisionModel"},
        "internvl_14b": {"configuration_internvl": "InternVLConfig", "modeling_internvl": "InternVLModel"},
    }.items():
        stub(enc + pkg)
        for mod, cls in mods.items():
            stub(enc + pkg + "." + mod, **{cls: type(cls, (), {})})


SHIM = inspect.getsource(shim)


def load_official(official: Path, model_dir: Path):
    sys.path.insert(0, str(official / "modPAI"))
    shim()
    from llava.model import LlavaLlamaForCausalLM

    # eager, as in the official environment (modPAI/environment.yml: torch 2.0.1, with which transformers
    # 4.37 never picks sdpa, is_torch_sdpa_available needs >= 2.1.1). Under sdpa, LlamaModel passes no
    # mask for an unpadded prefill and attention.py's replacement forward then runs without a causal mask.
    model = LlavaLlamaForCausalLM.from_pretrained(
        str(model_dir / "original"), torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model()
    ensure_clip_weights(tower.vision_tower, model_dir / "original" / "clip" / "model.safetensors")
    return model.float()


def ensure_clip_weights(clip, path: Path) -> None:
    """Load the tower's checkpoint strictly. CLIPVisionModel keys start with ``vision_model.``;
    a checkpoint written without that prefix is silently left at random init by from_pretrained
    (transformers 4.37 only warns), so restore the prefix and refuse any other mismatch."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    sd = {k if k.startswith("vision_model.") else "vision_model." + k: v for k, v in sd.items()}
    clip.load_state_dict(sd, strict=True)


class Recorder:
    """Wraps clip_encoder.update_modpai_alpha: records its inputs and outputs, changes nothing."""

    def __init__(self, clip_encoder):
        self.mod, self.orig, self.calls = clip_encoder, clip_encoder.update_modpai_alpha, []
        clip_encoder.update_modpai_alpha = self

    def __call__(self, vit_attn, shared_dict, *a, **k):
        out = self.orig(vit_attn, shared_dict, *a, **k)
        self.calls.append(
            (vit_attn, {"top": shared_dict["top_tokens"].clone(), "bottom": shared_dict["bottom_tokens"].clone()})
        )
        return out


def sorted_list(t: torch.Tensor) -> list[int]:
    return sorted(int(i) for i in t.flatten().tolist())


def selection_case(model, recorder, pixels: torch.Tensor, dtype: torch.dtype, spatial_ratio: float = 0.0) -> dict:
    """One vision-tower pass through the official tower; its selection and the CLS rows it came from."""
    import llava.model.multimodal_encoder.clip_encoder as ce
    from attention import llama_modify

    llama_modify(model, 2, 32, True, 0.7, 0.3, False, 0, 576)  # sets the tower's shared_dict (attention.py:187-188)
    tower = model.get_vision_tower()
    weights = {k: v.clone() for k, v in tower.state_dict().items()}  # a float16 round trip would round them
    tower.to(dtype)
    spatial_fn = ce.spatial_attention_top_tokens
    if spatial_ratio:  # the authors' edited ratio: clip_encoder.py:41 calls this with the default 0
        ce.spatial_attention_top_tokens = lambda attn, n, spatial_token_ratio=0: spatial_fn(attn, n, spatial_ratio)
    try:
        with torch.no_grad():
            tower(pixels.to(dtype))
    finally:
        ce.spatial_attention_top_tokens = spatial_fn
        tower.to(torch.float32)
        tower.load_state_dict(weights)
    vit_attn, out = recorder.calls[-1]
    case = {
        "dtype": str(dtype).removeprefix("torch."),
        "spatial_ratio": spatial_ratio,
        "local_tokens": sorted_list(out["top"]),  # final top_tokens: (top 25% | spatial) - summary
        "summary_tokens": sorted_list(out["bottom"]),
        # the official inputs of the arithmetic: per-head CLS rows over the 576 patches
        "cls_layer0": vit_attn[0][0, :, 0, -576:].float().tolist(),
        "cls_layer_m2": vit_attn[-2][0, :, 0, -576:].float().tolist(),
    }
    if spatial_ratio:
        case["spatial_tokens"] = sorted_list(spatial_fn(vit_attn[0][0], 576, spatial_ratio))
        case["spatial_row_sums"] = vit_attn[0][0].mean(dim=0).sum(dim=1).float().tolist()  # clip_encoder.py:32-33
    return case


class RawLogits:
    """First logits processor: records the conditional logits as generate hands them over."""

    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.detach().float().clone())
        return scores


def top_entries(row: torch.Tensor, k: int = TOP_LOGITS) -> dict:
    v, i = row.topk(k)
    return {"ids": i.tolist(), "values": v.tolist()}


def generation_case(model, pixels, before, after, alpha, beta, use_cfg, gamma=1.1) -> dict:
    """Greedy decoding as chair_eval.py:102-133 runs it (llama_modify, then CFGLogits when use_cfg)."""
    from transformers.generation.logits_process import LogitsProcessorList

    from attention import llama_modify
    from CFG import CFGLogits

    bos = tiny.LLAMA_COMMON["bos_token_id"]
    ids = torch.tensor([[bos, *before, tiny.IMAGE_TOKEN_INDEX, *after]])
    img_start = len(before) + 1  # model_loader.py:121
    llama_modify(model, 2, 32, True, alpha, beta, use_cfg, img_start, img_start + 576)
    raw = RawLogits()
    processors = [raw]
    if use_cfg:
        neg = torch.tensor([[bos, *before, *after]])  # model_loader.py:290
        processors.append(CFGLogits(gamma, neg, model, start_layer=2, end_layer=32))
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            images=pixels,
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            use_cache=True,
            num_beams=1,
            output_scores=True,
            return_dict_in_generate=True,
            logits_processor=LogitsProcessorList(processors),
            pad_token_id=tiny.LLAMA_COMMON["pad_token_id"],
        )
    steps = []
    for r, s in zip(raw.steps, out.scores):
        step = {"raw_top": top_entries(r[0]), "raw_logsumexp": float(torch.logsumexp(r[0], -1))}
        if use_cfg:  # the guided scores: log-probabilities, -inf below the cutoff (CFG.py:50-58)
            s = s[0].float()
            finite = torch.isfinite(s).nonzero().flatten()
            step.update(scores_finite_ids=finite.tolist(), scores_finite_values=s[finite].tolist())
        steps.append(step)
    new = out.sequences[0, ids.shape[1] :].tolist()
    return {
        "before": before,
        "after": after,
        "img_start_idx": img_start,
        "alpha": alpha,
        "beta": beta,
        "use_cfg": use_cfg,
        "gamma": gamma if use_cfg else None,
        "new_ids": new,
        "steps": steps,
    }


def checkout_commit(checkout: Path) -> str:
    """The checkout's commit: git's, else $PAINT_COMMIT (an exported tree); must be the audited one."""
    import os

    got = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    commit = (
        got.stdout.strip()
        if got.returncode == 0 and (checkout / ".git").exists()
        else os.environ.get("PAINT_COMMIT", "")
    )
    if commit != OFFICIAL_COMMIT:
        raise SystemExit(f"{checkout}: commit {commit or '(unknown: set PAINT_COMMIT)'} is not {OFFICIAL_COMMIT}")
    return commit


def pip_freeze() -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True)
    return out.stdout.split()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", type=Path, required=True, help="an export of hasanar1f/PAINT at 2a9e8f8")
    ap.add_argument("--model", type=Path, required=True, help="tiny_llava15.build() output directory")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    commit = checkout_commit(args.official)
    torch.manual_seed(927)  # chair_eval.py:19 (greedy decoding does not draw)

    info = json.loads((args.model / "model_info.json").read_text())
    model = load_official(args.official, args.model)
    import llava.model.multimodal_encoder.clip_encoder as ce

    recorder = Recorder(ce)
    pixels = tiny.fixed_pixels(N_IMAGES, seed=info["seed"])

    selection = []
    for i in range(N_IMAGES):
        px = pixels[i : i + 1]
        selection.append({"image": i, **selection_case(model, recorder, px, torch.float32)})
        selection.append({"image": i, **selection_case(model, recorder, px, torch.float16)})
        selection.append({"image": i, **selection_case(model, recorder, px, torch.float32, spatial_ratio=0.05)})

    generation = []
    for before, after in PROMPTS:
        for alpha, beta, use_cfg in ((0.7, 0.3, False), (0.7, 0.3, True)):
            generation.append({"image": 0, **generation_case(model, pixels[0:1], before, after, alpha, beta, use_cfg)})

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "selection.json").write_text(json.dumps(selection))
    (args.out / "generation.json").write_text(json.dumps(generation))
    provenance = {
        "repository": "https://github.com/hasanar1f/PAINT",
        "commit": commit,
        "official_files": [
            "modPAI/llava/model/multimodal_encoder/clip_encoder.py",
            "modPAI/attention.py",
            "modPAI/CFG.py",
            "modPAI/model_loader.py (prompt construction only, re-done from ids)",
            "modPAI/chair_eval.py (call order)",
        ],
        "command": "PAINT_COMMIT=" + commit + " bash bench/parity/regenerate.sh --paint /work/official/PAINT "
        "(= python bench/parity/tiny_llava15.py MODEL; /work/venvs/official/bin/python "
        "bench/parity/paint_official.py --official /work/official/PAINT --model MODEL --out tests/fixtures/official/paint)",
        "model": {"builder": "bench/parity/tiny_llava15.py", **info},
        "pixels": {
            "fn": f"tiny_llava15.fixed_pixels({N_IMAGES}, seed={info['seed']})",
            "sha256": tiny.tensor_sha256(pixels),
        },
        "shim": {"source": SHIM, "sha256": hashlib.sha256(SHIM.encode()).hexdigest()},
        "precision": "float32 on CPU; the selection also in float16 (selection.json entries with dtype float16)",
        "official_stack": {"python": sys.version.split()[0], "pip_freeze": pip_freeze()},
    }
    (args.out / "provenance.json").write_text(json.dumps(provenance, indent=1))
    print(f"wrote {args.out}: {len(selection)} selection cases, {len(generation)} generation cases")


if __name__ == "__main__":
    main()
