"""`lmms-plugins bench`: each technique against greedy llava_hf, same process, same model.

The model has LLaVA-1.5's geometry (336 px, 14 px patches, a 24x24 grid of 576 image tokens,
a POPE-style prompt of ~40 text tokens) with a few small random layers, so the ratios measure
the techniques' overheads, not a particular checkpoint; ``--family`` gives it LLaVA-NeXT's,
LLaVA-OneVision's, Qwen2.5-VL's or Gemma 3's geometry instead (and benches that family's names:
qwen2_5_vl_*, gemma3_*). For each case it reports:

- latency: the median over --repeats rounds of (case / baseline), each round timing the baseline
  and the case back to back in CPU time on one torch thread (robust to other jobs on the machine);
- forward passes: language-model forward calls per sample (prefill + decode steps + extras);
- peak memory: extra resident memory during one sample, measured in a fresh process per case
  (peak RSS reset after loading via /proc/self/clear_refs), as a ratio to the baseline.

Cases come from ``bench_cases(ctx)`` in each registered wrapper module, plus the hook layer's own.
Each case is (callable, baseline) with baseline "generate" (greedy generate) or "forward" (one
plain forward), or just a callable (baseline "generate").
"""

from __future__ import annotations

import dataclasses
import importlib
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
from methods.pai import Pai
from methods.technique import Request

PROMPT = "Is there a red circle in the image ? Answer the question using a single word or phrase ."


@dataclasses.dataclass
class BenchContext:
    model: object  # hooked model
    plain: object  # the same weights, plain sdpa (the llava_hf baseline)
    processor: object
    image: Image.Image
    inputs: dict
    request: Request
    gen_kwargs: dict


# --family: which real model's image geometry the random bench model has (testing.py builders)
FAMILIES = {
    "llava": ("llava15", "llava15_shaped"),
    "llava_next": ("llava_next", "llava_next_shaped"),
    "llava_onevision": ("llava_onevision", "llava_onevision_shaped"),
    "qwen2_5_vl": ("qwen2_5_vl", "qwen2_5_vl_shaped"),
    "gemma3": ("gemma3", "gemma3_shaped"),
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


def make_context(layers: int, new_tokens: int, hidden: int = 256, family: str = "llava") -> BenchContext:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    d = bench_model_dir(layers, hidden, family)
    processor = AutoProcessor.from_pretrained(d)
    plain = AutoModelForImageTextToText.from_pretrained(d).eval()
    model = AutoModelForImageTextToText.from_pretrained(d).eval()
    hooks.install(model)
    image = bench_image()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = dict(processor(images=[image], text=text, return_tensors="pt"))
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
    pai = Pai(n, use_cfg=False)

    def capture():
        cap = hooks.Capture(layers=deep, keys=ctx.request.image_pos)
        with hooks.edited(m, cap):
            m(**ctx.inputs)
        return cap

    eager = {}

    def output_attentions_eager():
        if "model" not in eager:  # loaded once, outside the timed region after the warm-up
            from transformers import AutoModelForImageTextToText

            eager["model"] = AutoModelForImageTextToText.from_pretrained(
                ctx.model.name_or_path, attn_implementation="eager"
            ).eval()
        return eager["model"](**ctx.inputs, output_attentions=True)

    return {
        "hooks idle (generate)": (lambda: m.generate(**ctx.inputs, **ctx.gen_kwargs), "generate"),
        "capture last row, deepest 2/3 layers": (capture, "forward"),
        "output_attentions=True (eager)": (output_attentions_eager, "forward"),
        f"{pai_name} (no CFG)": (lambda: pai.generate(m, ctx.request, **ctx.inputs, **ctx.gen_kwargs), "generate"),
    }


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


def time_against(fn, base_fn, repeats: int) -> tuple[float, float, float]:
    """(case seconds, baseline seconds, ratio): ``repeats`` rounds, each timing the baseline and then the
    case back to back, so drift and other jobs on the machine hit both alike; the ratio is the median of
    the per-round ratios. Time is this process's CPU time (the command runs torch on one thread, so it
    is the compute a sample costs, not the time spent waiting for a core)."""
    case_t, base_t, ratios = [], [], []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.process_time()
            base_fn()
            t1 = time.process_time()
            fn()
            t2 = time.process_time()
            base_t.append(t1 - t0)
            case_t.append(t2 - t1)
            ratios.append((t2 - t1) / max(t1 - t0, 1e-9))
    return statistics.median(case_t), statistics.median(base_t), statistics.median(ratios)


def _rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def peak_memory_one(case: str, layers: int, new_tokens: int, hidden: int, family: str = "llava") -> int:
    """Extra peak RSS (KiB) of one sample of ``case``, in this (fresh) process."""
    ctx = make_context(layers, new_tokens, hidden, family)
    cases = {**{f"baseline:{k}": (v, k) for k, v in baselines(ctx).items()}, **all_cases(ctx)}
    fn = cases[case][0]
    with torch.no_grad():
        if case.startswith("output_attentions"):
            fn()  # load the eager model first: its loading is not the case's cost
        before = _rss_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
        fn()
        return max(_rss_kb("VmHWM") - before, 0)


def peak_memory(case: str, layers: int, new_tokens: int, hidden: int, family: str = "llava") -> int | None:
    if not Path("/proc/self/clear_refs").exists():
        return None
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval_plugins.commands.bench",
        case,
        str(layers),
        str(new_tokens),
        str(hidden),
        family,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(f"  (memory of {case!r} not measured: {out.stderr[-300:]})", file=sys.stderr)
        return None


def main(args) -> int:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # CPU time = compute per sample (see time_against)
    ctx = make_context(args.layers, args.new_tokens, args.hidden, args.family)
    cases = all_cases(ctx)
    if args.only:
        cases = {k: v for k, v in cases.items() if any(s in k for s in args.only.split(","))}
    counter = ForwardCounter(ctx.model, ctx.plain)
    base_fns = baselines(ctx)
    base = {kind: (time_against(fn, fn, args.repeats)[1], passes_of(fn, counter)) for kind, fn in base_fns.items()}
    rows = []
    for name, (fn, kind) in cases.items():
        passes = passes_of(fn, counter)
        t, _, ratio = time_against(fn, base_fns[kind], args.repeats)
        rows.append(
            {
                "case": name,
                "baseline": kind,
                "latency_s": t,
                "latency_ratio": ratio,
                "passes": passes,
                "baseline_passes": base[kind][1],
            }
        )
        print(f"{name}: {t * 1000:.1f} ms CPU ({ratio:.2f}x {kind}), {passes} passes", flush=True)
    counter.remove()
    if args.memory:
        base_mem = {
            kind: peak_memory(f"baseline:{kind}", args.layers, args.new_tokens, args.hidden, args.family)
            for kind in base
        }
        for row in rows:
            mem = peak_memory(row["case"], args.layers, args.new_tokens, args.hidden, args.family)
            ref = base_mem[row["baseline"]]
            row["peak_mib"] = None if mem is None else mem / 1024
            row["memory_ratio"] = None if not (mem is not None and ref) else mem / ref
    text = render(rows, args, base, ctx)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def render(rows, args, base, ctx) -> str:
    geo = ctx.request.geometry
    blocks = " + ".join(
        f"{b.name} {b.rows}x{b.cols}" + (f" + {b.newlines.numel()} newlines" if b.newlines.numel() else "")
        for b in geo.blocks
    )
    from methods import families

    shape = families.adapter(args.family).display_name
    head = (
        f"{shape}-shaped random model ({args.layers} LM layers of width {args.hidden}; a {ctx.image.size[0]}x{ctx.image.size[1]} image = "
        f"{geo.all_positions().numel()} image tokens: {blocks}), {args.new_tokens} new tokens, median of {args.repeats} interleaved rounds, CPU time, {torch.get_num_threads()} thread\n"
    )
    head += f"baseline greedy generate: {base['generate'][0] * 1000:.1f} ms, {base['generate'][1]} passes; plain forward: {base['forward'][0] * 1000:.1f} ms\n\n"
    lines = ["| case | vs | latency | forward passes | peak memory |", "|---|---|---|---|---|"]
    for r in rows:
        mem = "-" if r.get("memory_ratio") is None else f"{r['memory_ratio']:.2f}x ({r['peak_mib']:.0f} MiB)"
        lines.append(
            f"| {r['case']} | {r['baseline']} | {r['latency_ratio']:.2f}x | {r['passes']} vs {r['baseline_passes']} | {mem} |"
        )
    return head + "\n".join(lines)


def register(sub) -> None:
    p = sub.add_parser("bench", help="latency / forward passes / peak memory of each technique vs greedy llava_hf")
    p.add_argument(
        "--family",
        default="llava",
        choices=sorted(FAMILIES),
        help="image geometry of the random model: LLaVA-1.5, LLaVA-NeXT or LLaVA-OneVision (anyres), or Qwen2.5-VL",
    )
    p.add_argument("--layers", type=int, default=4, help="language-model layers of the random model")
    p.add_argument(
        "--hidden",
        type=int,
        default=256,
        help="its hidden size (heads of 64 dims); wider = closer to real per-token cost",
    )
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", default="", help="comma-separated substrings of case names")
    p.add_argument("--memory", action="store_true", help="also measure peak memory (one fresh process per case)")
    p.add_argument("--markdown", default=None)
    p.add_argument("--json", default=None)
    p.set_defaults(func=main)


if __name__ == "__main__":  # one memory measurement, in a fresh process
    print(peak_memory_one(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:6]))
