"""Compare llava_pai preset=official with the official PAI fixtures; write provenance.json.

Runs in the project's venv after pai_official.py (bench/parity/regenerate.sh does both):

    python bench/parity/pai_compare.py --fixtures tests/fixtures/official/pai --model BUILD_DIR \
        --scratch SCRATCH --pai /work/official/PAI --official-python /work/venvs/official/bin/python

Reports, over the full vocabulary (the scratch tensors, not the trimmed fixtures): the layout
equivalence (plain prefill logits of every position, original layout under the official stack vs
the HF layout under ours) and, per run, the max abs difference of every step's scores and whether
the generated ids are equal.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import pai_ours  # noqa: E402
import tiny_llava15 as tiny  # noqa: E402

REPOSITORY = "https://github.com/LALBJ/PAI"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fa, fb):
        return float("inf")  # a different -inf (plausibility) mask
    return (a[fa] - b[fb]).abs().max().item() if fa.any() else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--scratch", required=True)
    ap.add_argument("--pai", required=True)
    ap.add_argument("--official-python", required=True)
    args = ap.parse_args()
    fixtures = Path(args.fixtures)
    golden = json.loads((fixtures / "pai_official.json").read_text())
    full = torch.load(Path(args.scratch) / "pai_official_full.pt")
    info = json.loads((Path(args.model) / "model_info.json").read_text())
    model = tiny.load_hf(args.model)
    assert tiny.fingerprint(model) == info["fingerprint"]
    pixels = tiny.fixed_pixels(1)
    assert tiny.tensor_sha256(pixels) == golden["pixels_sha256"]

    layout = {}
    for qi, prompt in enumerate(golden["prompts"]):
        with torch.no_grad():
            ours = model(input_ids=pai_ours.prompt_ids(prompt), pixel_values=pixels).logits[0]
        layout[qi] = max_diff(ours, full["layout"][str(qi)])
    runs = []
    for run, theirs in zip(golden["runs"], full["runs"]):
        out, n = pai_ours.run_ours(model, pixels, golden["prompts"][run["prompt"]], run)
        ours = torch.stack([s.float() for s in out.scores])
        same_ids = out.sequences[:, n:].tolist() == run["new_ids"]
        diff = max_diff(ours, theirs) if ours.shape == theirs.shape else float("inf")
        runs.append(
            {
                "name": run["name"],
                "num_beams": run["num_beams"],
                "prompt": run["prompt"],
                "ids_equal": same_ids,
                "max_abs_diff": diff,
            }
        )
        print(runs[-1], flush=True)

    # a git checkout knows its commit; an exported tree (git archive) needs PAI_COMMIT
    commit = subprocess.run(["git", "-C", args.pai, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    commit = commit or os.environ.get("PAI_COMMIT", "")
    if len(commit) != 40:
        raise SystemExit("cannot tell the official commit: use a git checkout or set PAI_COMMIT to the full hash")
    freeze = subprocess.run(
        [args.official_python, "-m", "pip", "freeze"], capture_output=True, text=True
    ).stdout.split()
    pyver = subprocess.run([args.official_python, "--version"], capture_output=True, text=True).stdout.strip()
    provenance = {
        "technique": "pai",
        "repository": REPOSITORY,
        "commit": commit,
        "official_code_run": [
            "attention.py (llama_modify, llama_new_forward)",
            "CFG.py (CFGLogits)",
            "model_loader.py (prepare_llava_inputs, ModelLoader.init_cfg_processor)",
            "constants.py",
            "llava/ (the repository's bundled package: LlavaLlamaForCausalLM, CLIPVisionTower)",
        ],
        "unmodified": True,
        "patch": None,
        "shim": {"file": "bench/parity/cpu_shim.py", "sha256": sha256(HERE / "cpu_shim.py")},
        "harness": {
            f: sha256(HERE / f) for f in ("pai_official.py", "tiny_llava15.py", "pai_ours.py", "pai_compare.py")
        },
        "harness_command": "bash bench/parity/regenerate.sh --pai /work/official/PAI",
        "official_stack": {
            "python": pyver,
            "pip_freeze": freeze,
            "device": "cpu",
            "dtype": "float32",
            "attn_implementation": "eager",
        },
        "notes": [
            "attn_implementation=eager: the official environment (environment.yml: torch 2.0.1, transformers 4.37.0) has no "
            "SDPA, so transformers ran eager attention; under SDPA 4.37 passes no prefill mask and the patched "
            "llama_new_forward (attention.py:67) would attend without a causal mask.",
            "Vicuna's tokenizer is not available offline: prompts are whitespace words hashed to ids by the harness "
            "(WordHashTokenizer); the official prepare_llava_inputs assembles BOS + system message + 'USER: ' + image + "
            "' question ASSISTANT:' and computes img_start_idx; the ids are recorded here, so CI needs no tokenizer.",
            "pixel_values are fixed tensors (tiny_llava15.fixed_pixels, sha256 recorded), fed to both layouts directly.",
            "fixtures keep per step the top-16 scores and indices, the count of finite scores and their sum and sum of "
            "squares; max_abs_diff below is over the full vocabulary (all finite entries; inf = a different -inf mask).",
        ],
        "model": {"builder": "bench/parity/tiny_llava15.py", "seed": info["seed"], "fingerprint": info["fingerprint"]},
        "layout_max_abs_diff": {"all_positions_full_vocab": max(layout.values()), "per_prompt": layout},
        "max_abs_diff": {"all_runs_all_steps": max(r["max_abs_diff"] for r in runs), "runs": runs},
        "all_ids_equal": all(r["ids_equal"] for r in runs),
    }
    (fixtures / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    print(
        "layout max abs diff",
        max(layout.values()),
        "runs max abs diff",
        provenance["max_abs_diff"]["all_runs_all_steps"],
    )
    print("ids equal in every run:", provenance["all_ids_equal"])


if __name__ == "__main__":
    main()
