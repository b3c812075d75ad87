"""Cost of llava_pm against greedy llava_hf on a LLaVA-1.5-shaped random model, in one process.

    python bench/pm_bench.py [--layers 4] [--repeats 5] [--json out.json]

The model has LLaVA-1.5's geometry (336 px, 14 px patches: 576 image tokens on a 24x24 grid)
and a few small layers; the image is 640x480 (a COCO/POPE size), the prompt about 40 tokens.
Latency is the fastest of the repeats (cases interleaved, so load from elsewhere hits all
alike). Peak memory is the largest rise of resident memory during the first call in a fresh
process (CPU; on CUDA, max_memory_allocated). Forward passes are counted per tower. The "reference-style" row does what the reference code does for each
pass: a whole-model forward with output_attentions=True (eager), vision tower included.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from lmms_eval_plugins.testing import llava15_shaped
from methods import hooks, pm, pm_view, pm_search
from methods.technique import Request

PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant . The assistant gives helpful , "
    "detailed , and polite answers to the question . USER: <image>\nIs there a red circle in the image ? "
    "Please answer this question with one word . ASSISTANT:"
)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_rss_rise(fn) -> int:
    """Largest rise of resident memory while ``fn`` runs (sampled every 0.2 ms)."""
    base, top, done = _rss(), [0], threading.Event()

    def watch():
        while not done.is_set():
            top[0] = max(top[0], _rss())
            time.sleep(0.0002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(top[0], _rss()) - base


class PassCounter:
    """Counts forward calls of the language model and the vision tower, and the token positions
    the language model computed (a load-independent measure of its work)."""

    def __init__(self, *models):
        self.counts = {"lm": 0, "lm_tokens": 0, "vision": 0}
        self.handles = []
        for model in models:
            self.handles += [
                model.model.language_model.register_forward_pre_hook(self._lm, with_kwargs=True),
                model.model.vision_tower.register_forward_pre_hook(lambda *a: self._hit("vision")),
            ]

    def _lm(self, module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        x = kwargs.get("input_ids") if x is None else x
        self.counts["lm"] += 1
        self.counts["lm_tokens"] += int(x.shape[1]) if x is not None else 0

    def _hit(self, tower):
        self.counts[tower] += 1

    def take(self):
        out, self.counts = dict(self.counts), {k: 0 for k in self.counts}
        return out

    def close(self):
        for h in self.handles:
            h.remove()


def _image():
    img = Image.new("RGB", (640, 480), (120, 140, 90))
    draw = ImageDraw.Draw(img)
    for i in range(12):
        x, y = 40 + 50 * i, 60 + 30 * (i % 7)
        draw.ellipse([x, y, x + 30, y + 30], fill=(200, 30 + 15 * i, 40))
    return img


def reference_style(eager_model, inputs, passes: int):
    """Each map pass as the reference runs it: whole model, output_attentions=True, no reuse."""
    pos = hooks.image_positions(inputs["input_ids"], eager_model.config.image_token_id)
    mask = torch.ones_like(inputs["input_ids"])
    rng = np.random.default_rng(0)
    for _ in range(passes):
        out = eager_model(**{**inputs, "attention_mask": mask}, output_attentions=True)
        _ = torch.stack([a[0, :, -1, pos].amax(0) for a in out.attentions]).sum(0)
        mask = mask.clone()
        mask[0, pos[torch.as_tensor(rng.random(pos.numel()) < 0.1)]] = 0
        del out


def setup(layers: int):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.manual_seed(0)
    ckpt = llava15_shaped(tempfile.mkdtemp(prefix="pm_bench_"), text_layers=layers)
    model = LlavaForConditionalGeneration.from_pretrained(ckpt).eval()
    processor = AutoProcessor.from_pretrained(ckpt)
    hooks.install(model)
    image = _image()
    inputs = processor(images=[image], text=PROMPT, return_tensors="pt")
    req = Request(
        inputs["input_ids"], model.config.image_token_id, inputs["input_ids"].shape[1], [image], PROMPT, processor
    )
    return ckpt, model, inputs, req


def _top_token(values):
    """Block exactly one token per pass (the current maximum): forces k refinement passes."""
    v = np.asarray(values)
    out = np.zeros(v.shape, dtype=bool)
    out.flat[int(np.argmax(v))] = True
    return out


class forced_passes:
    def __enter__(self):
        self.saved, pm_search.two_means_high = pm_search.two_means_high, _top_token

    def __exit__(self, *exc):
        pm_search.two_means_high = self.saved


def build_cases(ckpt, model, inputs, req, new_tokens=2, long_tokens=8):
    """name -> (callable, kind); kind "pope" cases compare with greedy, "long" with greedy (long)."""
    n_layers, grid = hooks.num_layers(model), pm_view.image_grid(model)
    pope = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    long = dict(max_new_tokens=long_tokens, min_new_tokens=long_tokens, do_sample=False)

    def technique(**params):
        return pm.PerceptionMagnifier(n_layers, grid, **params)

    def pm_case(gen, forced=False, **params):
        t = technique(**params)

        def call():
            if not forced:
                return t.generate(model, req, **inputs, **gen)
            with forced_passes():
                return t.generate(model, req, **inputs, **gen)

        call.technique = t
        return call

    cases = {"greedy": lambda: model.generate(**inputs, **pope)}
    cases["pm_once (paper defaults)"] = pm_case(pope)
    for k in (1, 2, 4, 8):
        cases[f"pm_once, k={k} passes"] = pm_case(pope, forced=True, beta=0.0, max_iter=k)
    cases["pm_once, k=8, block_rows=text"] = pm_case(pope, forced=True, beta=0.0, max_iter=8, block_rows="text")
    ref_k = 8
    from transformers import LlavaForConditionalGeneration

    eager = LlavaForConditionalGeneration.from_pretrained(ckpt, attn_implementation="eager").eval()

    def reference():
        reference_style(eager, inputs, 1 + ref_k)
        return eager.generate(**inputs, **pope)

    reference.model = eager
    cases[f"reference-style, k={ref_k} passes"] = reference
    cases["greedy (long)"] = lambda: model.generate(**inputs, **long)
    cases["pm_once (long)"] = pm_case(long)
    cases["pm_every_token (long)"] = pm_case(long, refresh="every_token")
    return cases


def memory_of(layers: int, name: str) -> int:
    """Peak resident-memory rise of one call of one case, in a fresh process (CPU)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, __file__, "--layers", str(layers), "--memory-case", name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.strip().splitlines()[-1])


def run(layers: int = 4, repeats: int = 5, new_tokens: int = 2, long_tokens: int = 8, memory: bool = True) -> dict:
    ckpt, model, inputs, req = setup(layers)
    cases = build_cases(ckpt, model, inputs, req, new_tokens, long_tokens)
    counter = PassCounter(model, *[fn.model for fn in cases.values() if hasattr(fn, "model")])
    rows = {name: {"times": []} for name in cases}
    with torch.no_grad():
        for name, fn in cases.items():  # warm-up, and the pass count of one call
            fn()
            counter.take()
            fn()
            rows[name].update(counter.take())
            if getattr(fn, "technique", None) is not None:
                rows[name]["iterations"] = fn.technique.last.get("iterations")
        for _ in range(repeats):  # interleaved, so that load from elsewhere hits every case alike
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                rows[name]["times"].append(time.perf_counter() - t0)
    counter.close()
    for name, r in rows.items():
        r["latency_s"] = min(r.pop("times"))  # the least disturbed run
        if memory:
            if str(model.device).startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                with torch.no_grad():
                    cases[name]()
                r["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            else:
                r["peak_mb"] = memory_of(layers, name) / 2**20
    base, base_long = rows["greedy"], rows["greedy (long)"]
    for name, r in rows.items():
        ref = base_long if "(long)" in name else base
        r["latency_x"] = r["latency_s"] / ref["latency_s"]
        r["lm_tokens_x"] = r["lm_tokens"] / ref["lm_tokens"]
        if memory:
            r["peak_x"] = r["peak_mb"] / max(ref["peak_mb"], 1e-9)
    extra = (rows["pm_every_token (long)"]["latency_s"] - rows["pm_once (long)"]["latency_s"]) / (long_tokens - 1)
    greedy_step = (base_long["latency_s"] - base["latency_s"]) / (long_tokens - new_tokens)
    return {
        "model": {
            "text_layers": layers,
            "deep_layers (0-based)": f"{cases['pm_once (paper defaults)'].technique.layers.start}..{layers - 1}",
            "image_tokens": pm_view.image_grid(model) ** 2,
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "image": "640x480",
            "pope_new_tokens": new_tokens,
            "long_new_tokens": long_tokens,
            "torch_threads": torch.get_num_threads(),
        },
        "rows": rows,
        "every_token_extra_per_token_s": extra,
        "greedy_decode_step_s": greedy_step,
        "every_token_extra_per_token_x_greedy_answer": extra / base["latency_s"],
    }


def markdown(result: dict) -> str:
    mem = "peak_mb" in next(iter(result["rows"].values()))
    head = "| case | latency (s) | x greedy | LM passes | LM token positions | x greedy | vision passes |"
    head += " peak mem (MB) | x greedy |" if mem else ""
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if mem else "")]
    for name, r in result["rows"].items():
        row = f"| {name} | {r['latency_s']:.3f} | {r['latency_x']:.2f} | {r['lm']} | {r['lm_tokens']} | {r['lm_tokens_x']:.2f} | {r['vision']} |"
        if mem:
            row += f" {r['peak_mb']:.1f} | {r['peak_x']:.2f} |"
        lines.append(row)
    lines.append("")
    lines.append(
        f"every_token costs +{result['every_token_extra_per_token_s']:.3f} s per generated token over refresh=once "
        f"(greedy decode step: {result['greedy_decode_step_s']:.3f} s; "
        f"{result['every_token_extra_per_token_x_greedy_answer']:.2f}x a whole greedy POPE answer)."
    )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-case memory subprocesses")
    ap.add_argument("--json", default=None)
    ap.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_case:  # one first call in a fresh process: no allocator cache from earlier calls
        ckpt, model, inputs, req = setup(args.layers)
        fn = build_cases(ckpt, model, inputs, req)[args.memory_case]
        with torch.no_grad():
            print(peak_rss_rise(fn))
        return 0
    result = run(layers=args.layers, repeats=args.repeats, memory=not args.no_memory)
    print(json.dumps(result["model"]))
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
