"""`lmms-plugins bench`: each technique against greedy llava_hf, same process, same model.

The model has LLaVA-1.5's geometry (336 px, 14 px patches, a 24x24 grid of 576 image tokens,
a POPE-style prompt of ~40 text tokens) with a few small random layers, so the ratios measure
the techniques' overheads, not a particular checkpoint; ``--family`` gives it LLaVA-NeXT's,
LLaVA-OneVision's, Qwen2.5-VL's, Gemma 3's, Qwen3-VL's or InternVL's geometry instead (and benches that
family's names: qwen2_5_vl_*, gemma3_*, qwen3_vl_*, internvl_hf_*). For each case it reports:

- latency: the median over --repeats rounds of (case / baseline), each round timing the baseline
  and the case back to back in CPU time on one torch thread (robust to other jobs on the machine;
  on a CUDA device, wall time with the device synchronised), and per new token for generate cases;
- forward passes: language-model forward calls per sample (prefill + decode steps + extras);
- peak memory: on a CPU with --memory, extra resident memory during one sample, measured in a fresh
  process per case (peak RSS reset after loading via /proc/self/clear_refs); on CUDA, the allocator's
  peak above what was allocated before the sample; as a ratio to the baseline ("n/a" when not measured).

Cases come from ``bench_cases(ctx)`` in each registered wrapper module, plus the hook layer's own.
Each case is (callable, baseline) with baseline "generate" (greedy generate) or "forward" (one
plain forward), or just a callable (baseline "generate"). A case whose default layers do not exist in
the bench model adapts them (``fit_layer``: the paper's layer scaled to the model's depth), and the
output says so.

``--shape llava-1.5-7b`` gives the random model LLaVA-1.5-7B's widths (``SHAPES``) at a depth chosen per
run (``--layers``, ``--vision-layers``; ``--depth full``: all 32 + 24 layers), ``--set`` overrides any width
(tests run the preset's code path at a tiny width). ``--device cuda --dtype bfloat16`` builds it directly on
the GPU (nothing to download) and times wall-clock with CUDA synchronised, peak memory from
``torch.cuda.max_memory_allocated``; the same code runs on a CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from methods import hooks
from methods.pai import DEFAULTS as pai_defaults
from methods.pai import Pai
from methods.technique import Request

PROMPT = "Is there a red circle in the image ? Answer the question using a single word or phrase ."


# The depths the papers' default layers were chosen for: LLaVA-1.5-7B's 32 LM and 24 CLIP layers.
PAPER_DEPTHS = {"lm": 32, "vision": 24}
# Layer parameters of the techniques' defaults, and the tower each counts in.
LAYER_PARAMS = {"start_layer": "lm", "local_layer": "vision", "summary_layer": "vision"}


def fit_layer(layer: int, n: int, paper_depth: int) -> int:
    """A default layer index (negative: from the end) on a model ``n`` layers deep. Unchanged where that layer
    exists; otherwise the same relative depth: the index on the paper's model scaled to ``n`` layers (as PM
    scales its deep layer 12 of 32), rounded down and clamped to the model's layers."""
    if -n <= layer < n:
        return layer
    absolute = layer + paper_depth if layer < 0 else layer
    return min(max(int(absolute * n / paper_depth), 0), n - 1)


@dataclasses.dataclass
class BenchContext:
    model: object  # hooked model
    plain: object  # the same weights, plain sdpa (the llava_hf baseline)
    processor: object
    image: Image.Image
    inputs: dict
    request: Request
    gen_kwargs: dict
    adapted: dict = dataclasses.field(default_factory=dict)  # notes on adapted layer defaults, printed

    def fit_layers(self, name: str, defaults: dict) -> dict:
        """The layer parameters of ``defaults`` that this model does not have, adapted by ``fit_layer``
        (pass them to the technique); each adaptation is noted for the output."""
        depth = {tower: hooks.num_layers(self.model, tower) for tower in PAPER_DEPTHS}
        fitted = {}
        for key, tower in LAYER_PARAMS.items():
            layer = defaults.get(key)
            if layer is None:
                continue
            new = fit_layer(layer, depth[tower], PAPER_DEPTHS[tower])
            if new != layer:
                fitted[key] = new
                self.adapted[f"{name}: {key} {layer} -> {new}"] = (
                    f"layer {layer} of {PAPER_DEPTHS[tower]} scaled to {depth[tower]} {tower} layers"
                )
        return fitted


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A real model's widths, built with random weights at the depth of ``text_layers`` / ``vision_layers``."""

    text_hidden: int
    text_heads: int
    kv_heads: int
    text_mlp: int
    vocab_size: int
    text_layers: int
    vision_hidden: int
    vision_heads: int
    vision_mlp: int
    vision_layers: int
    image_size: int
    patch_size: int


# --shape: the full-depth widths of real models (llava-hf/llava-1.5-7b-hf's config: Vicuna-7B, CLIP ViT-L/14
# at 336 px = 576 image tokens, the mlp2x_gelu projector 1024 -> 4096 -> 4096)
SHAPES = {
    "llava-1.5-7b": ModelShape(
        text_hidden=4096,
        text_heads=32,
        kv_heads=32,
        text_mlp=11008,
        vocab_size=32000,
        text_layers=32,
        vision_hidden=1024,
        vision_heads=16,
        vision_mlp=4096,
        vision_layers=24,
        image_size=336,
        patch_size=14,
    ),
}
SHAPE_VISION_LAYERS = 2  # --shape's default CLIP depth (--layers' default 4 is the LM's)


def resolve_shape(
    name: str, layers: int | None = None, vision_layers: int | None = None, depth: str = "reduced", overrides=()
) -> ModelShape:
    """The preset ``name`` at its full depth (``depth="full"``) or at ``layers`` LM and ``vision_layers`` CLIP
    layers, with ``overrides`` (``field=value`` strings or pairs) on any field."""
    shape = SHAPES[name]
    if depth != "full":
        shape = dataclasses.replace(shape, text_layers=layers or 4, vision_layers=vision_layers or SHAPE_VISION_LAYERS)
    fields = {f.name for f in dataclasses.fields(ModelShape)}
    changes = {}
    for item in overrides:
        key, value = item.split("=", 1) if isinstance(item, str) else item
        if key.strip() not in fields:
            raise ValueError(f"--set {key}: not a shape field; use one of {', '.join(sorted(fields))}")
        changes[key.strip()] = int(value)
    return dataclasses.replace(shape, **changes)


def shape_tokenizer(vocab_size: int):
    """The word-level test tokenizer padded with filler words to ``vocab_size`` entries, so every id the
    random model can generate decodes."""
    from .. import testing

    n = len(testing.build_tokenizer())
    if vocab_size < n:
        raise ValueError(f"vocab_size={vocab_size} is below the bench tokenizer's {n} tokens")
    return testing.build_tokenizer(words=[*testing.WORDS, *(f"filler{i}" for i in range(vocab_size - n))])


def shape_config(shape: ModelShape, tok=None):
    """The LlavaConfig of ``shape`` (testing.tiny_llava_config, the builder of every bench LLaVA)."""
    from .. import testing

    tok = tok or shape_tokenizer(shape.vocab_size)
    return testing.tiny_llava_config(
        tok,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        vision_hidden=shape.vision_hidden,
        vision_layers=shape.vision_layers,
        vision_heads=shape.vision_heads,
        vision_mlp=shape.vision_mlp,
        text_hidden=shape.text_hidden,
        text_layers=shape.text_layers,
        text_heads=shape.text_heads,
        kv_heads=shape.kv_heads,
        text_mlp=shape.text_mlp,
        vocab_size=shape.vocab_size,
    )


def build_shaped(shape: ModelShape, device: str, dtype: torch.dtype, seed: int = 0):
    """(model, processor) of ``shape`` with random weights, initialised directly on ``device`` in ``dtype``
    (a full-depth 7B model never exists in float32 or on the host)."""
    from transformers import LlavaForConditionalGeneration

    from .. import testing

    tok = shape_tokenizer(shape.vocab_size)
    config = shape_config(shape, tok)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), testing.tiny_llava_processor(tok, shape.image_size, shape.patch_size)


def twin(model, attn_implementation: str):
    """Another model object over the same weight tensors (no second copy of the weights), with its own
    config and attention implementation: the plain baseline beside the hooked model, the eager one."""
    shared = itertools.chain(model.parameters(), model.buffers())
    other = copy.deepcopy(model, memo={id(t): t for t in shared})
    other.set_attn_implementation(attn_implementation)
    return other.eval()


# --family: which real model's image geometry the random bench model has (testing.py builders)
FAMILIES = {
    "llava": ("llava15", "llava15_shaped"),
    "llava_next": ("llava_next", "llava_next_shaped"),
    "llava_onevision": ("llava_onevision", "llava_onevision_shaped"),
    "qwen2_5_vl": ("qwen2_5_vl", "qwen2_5_vl_shaped"),
    "gemma3": ("gemma3", "gemma3_shaped"),
    "qwen3_vl": ("qwen3_vl", "qwen3_vl_shaped"),
    "internvl": ("internvl", "internvl_shaped"),
}


def family_names(model) -> dict:
    """The registered names of the model's family (its adapter's ``name_prefix``) -> their technique."""
    from methods import families

    from ..models import MODELS

    prefix = families.adapter(model.config).name_prefix + "_"
    return {name: name.removeprefix(prefix) for name in MODELS if name.startswith(prefix)}


def geometry_inputs(model) -> tuple:
    """The processor outputs the family's geometry needs (its adapter's, as ``base.family_request``)."""
    from methods import families

    return families.adapter(model.config).request_inputs


def bench_model_dir(layers: int, hidden: int = 256, family: str = "llava") -> Path:
    from .. import testing

    stem, builder = FAMILIES[family]
    cache = Path(os.environ.get("LMMS_PLUGINS_CACHE", Path.home() / ".cache" / "lmms_plugins"))
    d = cache / f"bench_{stem}_{layers}l_{hidden}d"
    if not (d / "model.safetensors").exists():
        getattr(testing, builder)(d, text_layers=layers, text_hidden=hidden)
    return d


def bench_image(size: int = 336) -> Image.Image:
    img = Image.new("RGB", (size * 4 // 3, size), (235, 235, 225))
    draw = ImageDraw.Draw(img)
    for i, color in enumerate([(200, 30, 30), (30, 160, 40), (40, 60, 200)]):
        x = 40 + 140 * i
        draw.ellipse([x, 80 + 30 * i, x + 60 + 20 * i, 140 + 50 * i], fill=color)
    return img


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_context(
    layers: int,
    new_tokens: int,
    hidden: int = 256,
    family: str = "llava",
    *,
    shape: ModelShape | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> BenchContext:
    """The bench model, its plain twin and one POPE-style request: the family's small random model
    (``layers`` x ``hidden``, cached on disk), or ``shape`` (built in memory on ``device``)."""
    if shape is not None:
        plain, processor = build_shaped(shape, device, DTYPES[dtype])
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        d = bench_model_dir(layers, hidden, family)
        processor = AutoProcessor.from_pretrained(d)
        plain = AutoModelForImageTextToText.from_pretrained(d, dtype=DTYPES[dtype]).to(device).eval()
    model = twin(plain, plain.config._attn_implementation or "sdpa")
    hooks.install(model)
    image = bench_image()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = {
        k: v.to(device, dtype=DTYPES[dtype] if v.is_floating_point() else None)
        for k, v in processor(images=[image], text=text, return_tensors="pt").items()
    }
    req = Request(
        inputs["input_ids"],
        model.config.image_token_id,
        inputs["input_ids"].shape[1],
        [image],
        text,
        processor,
        config=model.config,
        inputs={k: inputs[k] for k in geometry_inputs(model) if k in inputs},
    )
    gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    return BenchContext(model, plain, processor, image, inputs, req, gen)


def core_cases(ctx: BenchContext) -> dict:
    m, n = ctx.model, hooks.num_layers(ctx.model)
    pai_name = next(name for name, technique in family_names(m).items() if technique == "pai")
    deep = range(n // 3, n)  # the deepest 2/3 of the layers
    pai = Pai(n, use_cfg=False, **ctx.fit_layers("pai", pai_defaults))

    def capture():
        cap = hooks.Capture(layers=deep, keys=ctx.request.image_pos)
        with hooks.edited(m, cap):
            m(**ctx.inputs)
        return cap

    eager = {}

    def output_attentions_eager():
        if "model" not in eager:  # made once, outside the timed region after the warm-up
            eager["model"] = twin(ctx.plain, "eager")
        return eager["model"](**ctx.inputs, output_attentions=True)

    cases = {
        "hooks idle (generate)": (lambda: m.generate(**ctx.inputs, **ctx.gen_kwargs), "generate"),
        "capture last row, deepest 2/3 layers": (capture, "forward"),
        "output_attentions=True (eager)": (output_attentions_eager, "forward"),
        f"{pai_name} (no CFG)": (lambda: pai.generate(m, ctx.request, **ctx.inputs, **ctx.gen_kwargs), "generate"),
    }
    if flash_attention_available(ctx.plain):  # stock on the fastest kernel, against stock sdpa
        flash = twin(ctx.plain, "flash_attention_2")
        cases["stock, flash_attention_2 (generate)"] = (
            lambda: flash.generate(**ctx.inputs, **ctx.gen_kwargs),
            "generate",
        )
    return cases


def flash_attention_available(model) -> bool:
    """flash-attention 2 is installed and the model is on a CUDA device in 16-bit."""
    from transformers.utils import is_flash_attn_2_available

    return (
        model.device.type == "cuda" and model.dtype in (torch.float16, torch.bfloat16) and is_flash_attn_2_available()
    )


def all_cases(ctx: BenchContext) -> dict:
    from ..models import MODELS

    cases = dict(core_cases(ctx))
    model_type = ctx.model.config.model_type
    for name, technique in family_names(ctx.model).items():  # each family benches its own names
        module = MODELS[name][0]
        try:
            mod = importlib.import_module(f"lmms_eval_plugins.models.{module}")
            if module != technique:  # one module, one spec per technique; the cases are its LLaVA twin's
                spec = mod.SPECS[technique]
                mod = importlib.import_module(f"lmms_eval_plugins.models.{technique}")
            else:
                spec = getattr(mod, "SPEC", None)
        except ModuleNotFoundError:
            continue
        if spec is not None and model_type in spec.refused:
            continue  # the technique refuses this family (README support matrix)
        if hasattr(mod, "bench_cases"):
            for case, fn in mod.bench_cases(ctx).items():
                cases[case if case.startswith(name) else f"{name}: {case}"] = fn
    return {k: (v if isinstance(v, tuple) else (v, "generate")) for k, v in cases.items()}


def baselines(ctx: BenchContext) -> dict:
    return {
        "generate": lambda: ctx.plain.generate(**ctx.inputs, **ctx.gen_kwargs),
        "forward": lambda: ctx.plain(**ctx.inputs),
    }


class ForwardCounter:
    """Counts language-model forward calls (one per prefill, decode step, or extra pass)."""

    def __init__(self, *models):
        self.n = 0
        self.handles = [m.model.language_model.register_forward_pre_hook(self._hit) for m in models]

    def _hit(self, *_):
        self.n += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def passes_of(fn, counter: ForwardCounter) -> int:
    """Language-model forward calls of one sample (after a warm-up call)."""
    with torch.no_grad():
        fn()
        counter.n = 0
        fn()
    return counter.n


def cuda_clock() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def clock_for(device: str):
    """CPU: this process's CPU time (the command runs torch on one thread, so it is the compute a sample costs,
    not the time spent waiting for a core); CUDA: wall time with the device synchronised."""
    return cuda_clock if torch.device(device).type == "cuda" else time.process_time


def time_against(fn, base_fn, repeats: int, clock=time.process_time) -> tuple[float, float, float]:
    """(case seconds, baseline seconds, ratio): ``repeats`` rounds, each timing the baseline and then the
    case back to back, so drift and other jobs on the machine hit both alike; the ratio is the median of
    the per-round ratios. ``clock``: see ``clock_for``."""
    case_t, base_t, ratios = [], [], []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = clock()
            base_fn()
            t1 = clock()
            fn()
            t2 = clock()
            base_t.append(t1 - t0)
            case_t.append(t2 - t1)
            ratios.append((t2 - t1) / max(t1 - t0, 1e-9))
    return statistics.median(case_t), statistics.median(base_t), statistics.median(ratios)


def cuda_peak_kib(fn) -> int:
    """Extra peak CUDA memory (KiB) of one call: ``torch.cuda.max_memory_allocated`` above what was allocated
    before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.no_grad():
        fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) // 1024


def _rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def context_spec(args) -> dict:
    """The bench model and request of a run, as JSON-able ``make_context`` arguments (a fresh process of a
    memory measurement rebuilds the same model from it)."""
    shape_name = getattr(args, "shape", None)
    shape = None
    if shape_name:
        if getattr(args, "hidden", None) is not None:
            raise ValueError("--hidden is the small model's width; with --shape use --set text_hidden=...")
        if args.family != "llava":
            raise ValueError(f"--shape {shape_name} is a LLaVA-1.5 shape; it needs --family llava")
        overrides = [item for group in getattr(args, "set", None) or [] for item in group.split(",") if item]
        shape = dataclasses.asdict(
            resolve_shape(shape_name, args.layers, args.vision_layers, getattr(args, "depth", "reduced"), overrides)
        )
    elif getattr(args, "vision_layers", None) or getattr(args, "set", None) or getattr(args, "depth", None) == "full":
        raise ValueError("--vision-layers, --set and --depth full choose a --shape's depth and widths; add --shape")
    return {
        "layers": shape["text_layers"] if shape else (args.layers or 4),
        "new_tokens": args.new_tokens,
        "hidden": shape["text_hidden"] if shape else (args.hidden or 256),
        "family": args.family,
        "shape": shape,
        "device": getattr(args, "device", "cpu"),
        "dtype": getattr(args, "dtype", "float32"),
    }


def context_of(spec: dict) -> BenchContext:
    shape = ModelShape(**spec["shape"]) if spec["shape"] else None
    return make_context(**{**spec, "shape": shape})


def peak_memory_one(case: str, spec: dict) -> int:
    """Extra peak RSS (KiB) of one sample of ``case``, in this (fresh) process."""
    ctx = context_of(spec)
    cases = {**{f"baseline:{k}": (v, k) for k, v in baselines(ctx).items()}, **all_cases(ctx)}
    fn = cases[case][0]
    with torch.no_grad():
        if case.startswith("output_attentions"):
            fn()  # make the eager twin first: it is not the case's cost
        before = _rss_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
        fn()
        return max(_rss_kb("VmHWM") - before, 0)


def peak_memory(case: str, spec: dict) -> int | None:
    if not Path("/proc/self/clear_refs").exists():
        return None
    cmd = [sys.executable, "-m", "lmms_eval_plugins.commands.bench", case, json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(f"  (memory of {case!r} not measured: {out.stderr[-300:]})", file=sys.stderr)
        return None


def main(args) -> int:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # CPU time = compute per sample (see clock_for)
    try:
        spec = context_spec(args)
    except ValueError as err:
        print(f"lmms-plugins bench: {err}", file=sys.stderr)
        return 2
    ctx = context_of(spec)
    if getattr(args, "batch", 0):
        return main_batch(args, spec, ctx)
    cases = all_cases(ctx)
    if args.only:
        cases = {k: v for k, v in cases.items() if any(s in k for s in args.only.split(","))}
    on_cuda = ctx.plain.device.type == "cuda"
    clock = clock_for(spec["device"])
    counter = ForwardCounter(ctx.model, ctx.plain)
    base_fns = baselines(ctx)
    base = {
        kind: (time_against(fn, fn, args.repeats, clock)[1], passes_of(fn, counter)) for kind, fn in base_fns.items()
    }
    rows = []
    for name, (fn, kind) in cases.items():
        passes = passes_of(fn, counter)
        t, base_t, ratio = time_against(fn, base_fns[kind], args.repeats, clock)
        rows.append(
            {
                "case": name,
                "baseline": kind,
                "latency_s": t,
                "latency_ratio": ratio,
                "ms_per_new_token": t * 1000 / spec["new_tokens"] if kind == "generate" else None,
                "baseline_ms_per_new_token": base_t * 1000 / spec["new_tokens"] if kind == "generate" else None,
                "passes": passes,
                "baseline_passes": base[kind][1],
            }
        )
        print(f"{name}: {t * 1000:.1f} ms ({ratio:.2f}x {kind}), {passes} passes", flush=True)
    counter.remove()
    if on_cuda:  # in this process: the allocator's own peak, no fresh process needed
        base_mem = {kind: cuda_peak_kib(fn) for kind, fn in base_fns.items()}
        mems = [cuda_peak_kib(fn) for fn, _ in cases.values()]
    elif args.memory:
        base_mem = {kind: peak_memory(f"baseline:{kind}", spec) for kind in base}
        mems = [peak_memory(row["case"], spec) for row in rows]
    if on_cuda or args.memory:
        for row, mem in zip(rows, mems):
            ref = base_mem[row["baseline"]]
            row["peak_mib"] = None if mem is None else mem / 1024
            row["memory_ratio"] = None if not (mem is not None and ref) else mem / ref
    text = render(rows, spec, args.repeats, base, ctx)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def main_batch(args, spec: dict, ctx: BenchContext) -> int:
    """``--batch N``: the throughput table only (``batch_throughput``)."""
    rows = batch_throughput(ctx, args.batch, args.repeats, clock_for(spec["device"]), args.only)
    where = "CPU time, 1 thread" if ctx.plain.device.type != "cuda" else "wall time, CUDA synchronised"
    text = f"{describe_model(spec, ctx)}, {spec['dtype']} on {ctx.plain.device.type}, median of {args.repeats} rounds, {where}\n\n"
    text += render_batch(rows, spec["new_tokens"])
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def describe_model(spec: dict, ctx: BenchContext) -> str:
    """What the random model is: the shape's widths and depth, or the family's small model."""
    geo = ctx.request.geometry
    blocks = " + ".join(
        f"{b.name} {b.rows}x{b.cols}" + (f" + {b.newlines.numel()} newlines" if b.newlines.numel() else "")
        for b in geo.blocks
    )
    image = f"a {ctx.image.size[0]}x{ctx.image.size[1]} image = {geo.all_positions().numel()} image tokens: {blocks}"
    if spec["shape"]:
        s = ModelShape(**spec["shape"])
        full = SHAPES["llava-1.5-7b"]
        return (
            f"LLaVA-1.5-7B-shaped random model (LM {s.text_layers} of {full.text_layers} layers: hidden "
            f"{s.text_hidden}, {s.text_heads} heads, MLP {s.text_mlp}, vocab {s.vocab_size}; CLIP {s.vision_layers} of "
            f"{full.vision_layers} layers: hidden {s.vision_hidden}, {s.vision_heads} heads, MLP {s.vision_mlp}, "
            f"{s.image_size} px / {s.patch_size} px patches; mlp2x_gelu projector; {image})"
        )
    from methods import families

    shape = families.adapter(spec["family"]).display_name
    return f"{shape}-shaped random model ({spec['layers']} LM layers of width {spec['hidden']}; {image})"


def render(rows, spec: dict, repeats: int, base, ctx) -> str:
    plain = ctx.plain
    weights = sum(p.numel() * p.element_size() for p in plain.parameters()) / 2**30
    if plain.device.type == "cuda":
        where = f"wall time on {torch.cuda.get_device_name(plain.device)} (CUDA synchronised)"
        memory = "peak memory: torch.cuda.max_memory_allocated above the allocation before the sample"
    else:
        where = f"CPU time, {torch.get_num_threads()} thread"
        memory = "peak memory: " + (
            "extra peak RSS of one sample, a fresh process per case" if any("peak_mib" in r for r in rows) else "n/a"
        )
    flash = (
        "flash_attention_2 installed: its stock row below"
        if flash_attention_available(plain)
        else "flash_attention_2: not used (not installed, or not a 16-bit CUDA model)"
    )
    head = (
        f"{describe_model(spec, ctx)}, {spec['new_tokens']} new tokens, {spec['dtype']} on {plain.device.type} "
        f"(weights {weights:.2f} GiB, shared by stock and the hooked model), median of {repeats} interleaved rounds, "
        f"{where}\n"
    )
    head += (
        f"attention: stock {plain.config._attn_implementation}; techniques {ctx.model.config._attn_implementation} "
        "(a layer without an edit calls the same sdpa function, so it keeps stock's kernel; only edited query "
        f"rows are recomputed eagerly); {flash}\n"
    )
    if ctx.adapted:
        head += "default layers adapted to this depth: " + "; ".join(f"{k} ({v})" for k, v in ctx.adapted.items())
        head += "\n"
    per_token = base["generate"][0] * 1000 / spec["new_tokens"]
    head += (
        f"baseline greedy generate: {base['generate'][0] * 1000:.1f} ms ({per_token:.1f} ms per new token), "
        f"{base['generate'][1]} passes; plain forward: {base['forward'][0] * 1000:.1f} ms; {memory}\n\n"
    )
    lines = [
        "| case | vs | latency | ms per new token | forward passes | peak memory |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("memory_ratio") is not None:
            mem = f"{r['memory_ratio']:.2f}x ({r['peak_mib']:.0f} MiB)"
        else:
            mem = "n/a" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f} MiB"
        tok = "-"
        if r["ms_per_new_token"] is not None:  # against the baseline timed in the same rounds
            tok = f"{r['ms_per_new_token']:.1f} vs {r['baseline_ms_per_new_token']:.1f}"
        lines.append(
            f"| {r['case']} | {r['baseline']} | {r['latency_ratio']:.2f}x | {tok} | {r['passes']} vs "
            f"{r['baseline_passes']} | {mem} |"
        )
    return head + "\n".join(lines)


# ---------------------------------------------------------------------------------------
# --batch N: throughput of a left-padded batch against the same requests one at a time
# ---------------------------------------------------------------------------------------

# Words appended to the bench prompt so the requests of a batch differ in length (and the batch is padded).
EXTRA_WORDS = "please answer with one word using the image".split()


def batch_requests(ctx: BenchContext, n: int) -> list[tuple[Image.Image, str]]:
    """``n`` POPE-style requests that differ: images of different sizes and colours, prompts of different lengths."""
    out = []
    for i in range(n):
        image = bench_image().resize((ctx.image.size[0] - 16 * i, ctx.image.size[1] + 8 * i))
        image.paste((30 * i % 255, 90, 200), (10 * i, 10, 10 * i + 40, 50))
        question = f"{PROMPT} {' '.join(EXTRA_WORDS[: i % (len(EXTRA_WORDS) + 1)])}".strip()
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        out.append((image, ctx.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)))
    return out


def batch_cases(ctx: BenchContext) -> dict:
    """name -> technique (None: stock, the plain model) for the batch table: the techniques issue 31 targets, and PM."""
    from methods.knockout import Knockout
    from methods.paint import DEFAULTS as paint_defaults
    from methods.paint import Paint
    from methods.pm import PerceptionMagnifier
    from methods.pm_view import image_grid

    n = hooks.num_layers(ctx.model)
    return {
        "stock (plain generate)": None,
        "pai (no CFG)": Pai(n, use_cfg=False, **ctx.fit_layers("pai", pai_defaults)),
        "pai (CFG)": Pai(n, use_cfg=True, **ctx.fit_layers("pai", pai_defaults)),
        "paint (no CFG)": Paint.for_model(ctx.model, **ctx.fit_layers("paint", paint_defaults)),
        "knockout (query, middle layers)": Knockout(
            n, mode="query", from_layer=n // 4, to_layer=max(n // 4 + 1, 3 * n // 4)
        ),
        "pm (once: each request's search alone, one batched generate)": PerceptionMagnifier(n, image_grid(ctx.model)),
    }


def _calls(ctx: BenchContext, technique, pairs):
    """A callable generating ``pairs`` in one call (left-padded when several), through the wrappers' request path."""
    from ..base import RecordingProcessor, family_request

    processor = RecordingProcessor(ctx.processor)
    texts, images = [t for _, t in pairs], [im for im, _ in pairs]
    pad = {"padding": True, "padding_side": "left"} if len(pairs) > 1 else {}
    inputs = processor(images=images, text=texts if len(pairs) > 1 else texts[0], return_tensors="pt", **pad)
    dtype = ctx.plain.dtype
    inputs = {k: v.to(ctx.plain.device, dtype=dtype if v.is_floating_point() else None) for k, v in inputs.items()}
    req = family_request(ctx.model, processor, inputs)
    if technique is None:
        return lambda: ctx.plain.generate(**inputs, **ctx.gen_kwargs)
    return lambda: technique.generate(ctx.model, req, **inputs, **ctx.gen_kwargs)


def batch_throughput(ctx: BenchContext, n: int, repeats: int, clock, only: str = "") -> list[dict]:
    """Per case: CPU (or CUDA wall) seconds per request generating the ``n`` requests one at a time and as one
    batch of ``n``, their ratio (throughput gain), and the batch's cost against stock's batch of ``n``. Also the
    prefill's share of one request at batch 1 (a plain forward over its prompt), which bounds the gain where
    the prefill is compute-bound (a CPU)."""
    pairs = batch_requests(ctx, n)
    rows = []
    cases = batch_cases(ctx)
    keep = [s for s in only.split(",") if s]
    cases = {k: v for k, v in cases.items() if k.startswith("stock") or not keep or any(s in k for s in keep)}
    for name, technique in cases.items():
        one = [_calls(ctx, technique, [p]) for p in pairs]
        many = _calls(ctx, technique, pairs)
        with torch.no_grad():
            one[0]()  # warm-up (one request: a batch's first call has no extra cost worth a whole batch here)
            t_one, t_many = [], []
            for _ in range(repeats):
                t0 = clock()
                for fn in one:
                    fn()
                t1 = clock()
                many()
                t2 = clock()
                t_one.append((t1 - t0) / n)
                t_many.append((t2 - t1) / n)
        rows.append({"case": name, "batch": n, "s_per_request_1": statistics.median(t_one)})
        rows[-1]["s_per_request_n"] = statistics.median(t_many)
        rows[-1]["gain"] = rows[-1]["s_per_request_1"] / rows[-1]["s_per_request_n"]
        print(f"batch {n} {name}: {rows[-1]['gain']:.2f}x throughput", flush=True)
    stock = rows[0]
    for r in rows:
        r["vs_stock_1"] = r["s_per_request_1"] / stock["s_per_request_1"]
        r["vs_stock_n"] = r["s_per_request_n"] / stock["s_per_request_n"]
    with torch.no_grad():
        prefill = _prefill_seconds(ctx, pairs[:1], repeats, clock)
        prefill_n = _prefill_seconds(ctx, pairs, repeats, clock) / n
    for r in rows:
        r["stock_prefill_s"], r["stock_prefill_s_batched"] = prefill, prefill_n
    return rows


def _prefill_seconds(ctx: BenchContext, pairs, repeats: int, clock) -> float:
    """Seconds of stock's prefill (one plain forward, logits for the last row only) over ``pairs`` as one batch."""
    pad = {"padding": True, "padding_side": "left"} if len(pairs) > 1 else {}
    text = [t for _, t in pairs] if len(pairs) > 1 else pairs[0][1]
    inputs = ctx.processor(images=[im for im, _ in pairs], text=text, return_tensors="pt", **pad)
    dtype = ctx.plain.dtype
    inputs = {k: v.to(ctx.plain.device, dtype=dtype if v.is_floating_point() else None) for k, v in inputs.items()}
    ctx.plain(**inputs, logits_to_keep=1)  # as generate's prefill: the vocabulary only for the last row
    times = []
    for _ in range(repeats):
        t0 = clock()
        ctx.plain(**inputs, logits_to_keep=1)
        times.append(clock() - t0)
    return statistics.median(times)


def render_batch(rows: list[dict], new_tokens: int) -> str:
    n = rows[0]["batch"]
    stock = rows[0]
    share = stock["stock_prefill_s"] / stock["s_per_request_1"]
    bound = 1 / (share + (1 - share) / n)
    lines = [
        f"batch {n} against batch 1: the same {n} requests (images of different sizes, prompts of different lengths, "
        f"left-padded), {new_tokens} new tokens each, generated one at a time and as one batch; seconds per request. "
        f"Stock's prefill (one plain forward over a prompt) is {share:.0%} of its batch-1 request "
        f"({stock['stock_prefill_s']:.3g} s; batched, {stock['stock_prefill_s_batched']:.3g} s per request): if "
        f"batching sped up only the decoding, the gain would be at most {bound:.2f}x.",
        "",
        f"| case | batch 1: s / request | batch {n}: s / request | throughput gain | vs stock at batch 1 | vs stock at batch {n} |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['s_per_request_1']:.3g} | {r['s_per_request_n']:.3g} | {r['gain']:.2f}x | "
            f"{r['vs_stock_1']:.2f}x | {r['vs_stock_n']:.2f}x |"
        )
    return "\n".join(lines)


def register(sub) -> None:
    p = sub.add_parser("bench", help="latency / forward passes / peak memory of each technique vs greedy llava_hf")
    p.add_argument(
        "--family",
        default="llava",
        choices=sorted(FAMILIES),
        help="image geometry of the random model: LLaVA-1.5, LLaVA-NeXT or LLaVA-OneVision (anyres), Qwen2.5-VL, Gemma 3, "
        "Qwen3-VL or InternVL (HF); each family benches its own names",
    )
    p.add_argument(
        "--shape",
        default=None,
        choices=sorted(SHAPES),
        help="a real model's widths (random weights) instead of the small model: llava-1.5-7b = hidden 4096, 32 "
        "heads, MLP 11008, vocab 32000, CLIP-L/14 at 336 px (1024, 16 heads, MLP 4096), mlp2x_gelu",
    )
    p.add_argument("--layers", type=int, default=None, help="language-model layers of the random model (default 4)")
    p.add_argument(
        "--vision-layers",
        type=int,
        default=None,
        help=f"with --shape: CLIP layers (default {SHAPE_VISION_LAYERS})",
    )
    p.add_argument(
        "--depth",
        default="reduced",
        choices=["reduced", "full"],
        help="with --shape: full = the real model's depth (32 LM + 24 CLIP layers for llava-1.5-7b)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="FIELD=VALUE[,...]",
        help="with --shape: override widths, e.g. text_hidden=64,text_heads=2 (fields: "
        + ", ".join(f.name for f in dataclasses.fields(ModelShape))
        + ")",
    )
    p.add_argument(
        "--hidden",
        type=int,
        default=None,
        help="the small model's hidden size (default 256, heads of 64 dims); wider = closer to real per-token cost",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the model is built and run")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", default="", help="comma-separated substrings of case names")
    p.add_argument(
        "--memory",
        action="store_true",
        help="CPU: also measure peak memory (one fresh process per case); CUDA measures it always",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=0,
        help="N > 1: instead of the cases, the throughput of stock, PAI (with and without CFG), PAINT and knockout "
        "generating N different requests as one left-padded batch against one at a time (--only filters them)",
    )
    p.add_argument("--markdown", default=None)
    p.add_argument("--json", default=None)
    p.set_defaults(func=main)


if __name__ == "__main__":  # one memory measurement, in a fresh process: CASE SPEC_JSON
    print(peak_memory_one(sys.argv[1], json.loads(sys.argv[2])))
