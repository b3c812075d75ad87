"""Max abs diffs of our knockout presets against the vlm-interp oracle run; writes provenance.json.

    python bench/parity/vlminterp_compare.py --fixtures tests/fixtures/official/knockout --scratch DIR \
        --official-python /work/venvs/official/bin/python
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

import torch  # noqa: E402

import tiny_llava15 as tiny  # noqa: E402
import vlminterp_ours  # noqa: E402


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def official_versions(python: str) -> dict:
    v = subprocess.run(
        [python, "-c", "import torch, transformers, importlib.metadata as m; "
         "print(torch.__version__, transformers.__version__, m.version('llava-torch'))"],
        capture_output=True, text=True, check=True).stdout.split()
    return {"torch": v[0], "transformers": v[1], "llava-torch": v[2], "attn_implementation": "eager",
            "dtype": "float32", "device": "cpu"}


def compare_prune(args):
    fx = Path(args.fixtures)
    golden = json.loads((fx / "prune_official.json").read_text())
    full = torch.load(Path(args.scratch) / "prune_official_full.pt")
    model = tiny.build_hf_model(tiny.SEED)
    pixels = tiny.fixed_pixels(1)
    report = {"selections": {}, "runs": {}}
    for sel, want in golden["selections"].items():
        kept, new = vlminterp_ours.selection_ours(model, pixels, golden, sel)
        same = sum(set(kept[l].tolist()) == set(want[l]) for l in kept)  # norm: official 33 entries, 32 used
        report["selections"][sel] = {"layers_equal": f"{same}/{len(kept)}", "describe_ids_equal": new == golden["describe"]["new_ids"]}
        print(sel, report["selections"][sel], flush=True)
    for run in golden["runs"]:
        out, n = vlminterp_ours.run_prune_ours(model, pixels, golden, run)
        ours = torch.stack([s[0].float() for s in out.scores])
        key = f"{run['selection']}/{run['name']}"
        report["runs"][key] = {"ids_equal": out.sequences[0, n:].tolist() == run["new_ids"],
                               "max_abs_diff_full_vocab": float((ours - full[key]).abs().max())}
        print(key, report["runs"][key], flush=True)
    fastv = json.loads((fx / "fastv_official.json").read_text())
    full_fastv = torch.load(Path(args.scratch) / "fastv_official_full.pt")
    for run in fastv["runs"]:
        out, n = vlminterp_ours.run_fastv_ours(model, pixels, fastv, run)
        ours = torch.stack([s[0].float() for s in out.scores])
        report["runs"][run["name"]] = {"ids_equal": out.sequences[0, n:].tolist() == run["new_ids"],
                                       "last_image_token_in_topk": run["last_image_token_in_topk"],
                                       "max_abs_diff_full_vocab": float((ours - full_fastv[run["name"]]).abs().max())}
        print(run["name"], report["runs"][run["name"]], flush=True)
    cache_golden = json.loads((fx / "cache_official.json").read_text())
    full_cache = torch.load(Path(args.scratch) / "cache_official_full.pt")
    for run in cache_golden["runs"]:
        out, ctx = vlminterp_ours.run_cache_ours(model, pixels, golden, cache_golden, run)
        ours = torch.stack([s[0].float() for s in out.scores])
        n = out.sequences.shape[1] - len(out.scores)
        report["runs"][f"cache_{run['strategy']}"] = {
            "entries": [ctx.entries, run["entries"]], "position_offset": [ctx.next_position, run["position_offset"]],
            "ids_equal": out.sequences[0, n:].tolist() == run["new_ids"],
            "max_abs_diff_full_vocab": float((ours - full_cache[run["strategy"]]).abs().max())}
        print(run["strategy"], report["runs"][f"cache_{run['strategy']}"], flush=True)
    prov = {
        "repository": "OmriKaduri/vlm-interp",
        "commit": golden["commit"],
        "kind": "oracle (as tests/fixtures/official/knockout): official stack, run_on_coco.py's describe pass and "
                "attention_store.get_top_k_indices written out in bench/parity/vlminterp_prune.py, the "
                "leave_k_highest_indices masking in vlminterp_knockout.official_mask",
        "command": "bash bench/parity/regenerate.sh --vlminterp --python /work/venvs/fresh/bin/python",
        "official_stack": official_versions(args.official_python),
        "harness_sha256": {p: sha256(HERE / p) for p in ("vlminterp_prune.py", "vlminterp_fastv.py", "vlminterp_cache.py", "vlminterp_knockout.py", "cpu_shim.py", "tiny_llava15.py")},
        "model": {"seed": tiny.SEED, "fingerprint": tiny.fingerprint(model)},
        "fixture": "prune_official.json: describe-pass ids, per-layer kept positions per selection method, "
                   "pruned generations (6 greedy steps: top-16 scores + row sum); fastv_official.json: FastV "
                   "(LlamaModel.forward's fastv block, written out in bench/parity/vlminterp_fastv.py) at K=2 R=0.5 and "
                   "K=16 R=0.05, kept positions and 6 greedy steps; cache_official.json: chat_step_by_step_from_cache "
                   "(written out in bench/parity/vlminterp_cache.py) for qs, q, s: entries, position offset, 6 greedy steps",
        "measured": report,
    }
    (fx / "provenance.json").write_text(json.dumps(prov, indent=2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", required=True)
    ap.add_argument("--scratch", required=True, help="vlminterp_knockout.py --scratch output")
    ap.add_argument("--official-python", required=True)
    ap.add_argument("--prune", action="store_true", help="the pruning fixtures (vlminterp_prune.py, vlminterp_fastv.py)")
    args = ap.parse_args()
    if args.prune:
        return compare_prune(args)
    fx = Path(args.fixtures)
    golden = json.loads((fx / "knockout_official.json").read_text())
    full = torch.load(Path(args.scratch) / "knockout_official_full.pt")
    model = tiny.build_hf_model(tiny.SEED)
    pixels = tiny.fixed_pixels(1)
    report = {}
    for run in golden["runs"]:
        out, n = vlminterp_ours.run_ours(model, pixels, golden, run)
        ours = torch.stack([s[0].float() for s in out.scores])
        report[run["name"]] = {
            "ours": vlminterp_ours.official_params(run["flags"]),
            "ids_equal": out.sequences[0, n:].tolist() == run["new_ids"],
            "max_abs_diff_full_vocab": float((ours - full[run["name"]]).abs().max()),
        }
        print(run["name"], report[run["name"]], flush=True)
    prov = {
        "repository": "OmriKaduri/vlm-interp",
        "commit": golden["commit"],
        "kind": "oracle: official stack (llava-torch LLaVA-1.5, transformers 4.37.2 eager generate) with the "
                "masking rules of modified_llava_files/modeling_llama.py LlamaAttention.forward written out in the "
                "harness; the patched file itself needs the patched generation utils (modified_llava_files/utils.py, "
                "252k chars) to receive its kwargs, and neither could be checked out (no snapshot of the repository)",
        "command": "bash bench/parity/regenerate.sh --vlminterp --python /work/venvs/fresh/bin/python",
        "official_stack": official_versions(args.official_python),
        "harness_sha256": {p: sha256(HERE / p) for p in ("vlminterp_knockout.py", "cpu_shim.py", "tiny_llava15.py")},
        "model": {"seed": tiny.SEED, "fingerprint": tiny.fingerprint(model)},
        "fixture": "knockout_official.json: per run the flags, the 6 greedy ids, per step top-16 scores + row sum",
        "measured": report,
    }
    (fx / "provenance.json").write_text(json.dumps(prov, indent=2))


if __name__ == "__main__":
    main()
