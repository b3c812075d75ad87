"""Max abs diffs of our knockout / pruning presets against the official vlm-interp run; writes provenance.json.

    python bench/parity/vlminterp_compare.py --fixtures tests/fixtures/official/knockout --scratch DIR \
        --official-python /work/venvs/official/bin/python
"""

from __future__ import annotations

import argparse
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


def official_versions(python: str) -> dict:
    v = subprocess.run(
        [
            python,
            "-c",
            "import torch, transformers, importlib.metadata as m; "
            "print(torch.__version__, transformers.__version__, m.version('llava-torch'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return {
        "torch": v[0],
        "transformers": v[1],
        "llava-torch": v[2],
        "attn_implementation": "eager",
        "dtype": "float32",
        "device": "cpu",
    }


KIND = {
    "kind": "official code run unmodified: modified_llava_files/{modeling_llama,utils}.py copied over transformers "
    "4.37.2 (update_local_env_llava.sh), the LLaVA fork's llava_arch.py / llava_llama.py over llava-torch "
    "1.2.2.post1, LlavaWrapper.chat_step_by_step / predict_from_cache and TokenAttentionStore from mllm/; "
    "driven by bench/parity/vlminterp_official.py (its docstring lists what is driven by hand)",
    "command": "VLMINTERP_LLAVA=/work/official/vlm-interp/llava_fork_files bash bench/parity/regenerate.sh "
    "--vlminterp /work/official/vlm-interp --python /work/venvs/fresh/bin/python",
}


def official_meta(scratch) -> dict:
    """Hashes of the official files and of the harness, written by vlminterp_official.py."""
    return json.loads((Path(scratch) / "official_meta.json").read_text())


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
        report["selections"][sel] = {
            "layers_equal": f"{same}/{len(kept)}",
            "describe_ids_equal": new == golden["describe"]["new_ids"],
        }
        print(sel, report["selections"][sel], flush=True)
    for run in golden["runs"]:
        out, n = vlminterp_ours.run_prune_ours(model, pixels, golden, run)
        ours = torch.stack([s[0].float() for s in out.scores])
        key = f"{run['selection']}/{run['name']}"
        report["runs"][key] = {
            "ids_equal": out.sequences[0, n:].tolist() == run["new_ids"],
            "max_abs_diff_full_vocab": float((ours - full[key]).abs().max()),
        }
        print(key, report["runs"][key], flush=True)
    fastv = json.loads((fx / "fastv_official.json").read_text())
    full_fastv = torch.load(Path(args.scratch) / "fastv_official_full.pt")
    for run in fastv["runs"]:
        out, n = vlminterp_ours.run_fastv_ours(model, pixels, fastv, run)
        ours = torch.stack([s[0].float() for s in out.scores])
        report["runs"][run["name"]] = {
            "ids_equal": out.sequences[0, n:].tolist() == run["new_ids"],
            "last_image_token_in_topk": run["last_image_token_in_topk"],
            "max_abs_diff_full_vocab": float((ours - full_fastv[run["name"]]).abs().max()),
        }
        print(run["name"], report["runs"][run["name"]], flush=True)
    cache_golden = json.loads((fx / "cache_official.json").read_text())
    full_cache = torch.load(Path(args.scratch) / "cache_official_full.pt")
    for run in cache_golden["runs"]:
        out, ctx = vlminterp_ours.run_cache_ours(model, pixels, golden, cache_golden, run)
        ours = torch.stack([s[0].float() for s in out.scores])
        n = out.sequences.shape[1] - len(out.scores)
        report["runs"][f"cache_{run['strategy']}"] = {
            "entries": [ctx.entries, run["entries"]],
            "position_offset": [ctx.next_position, run["position_offset"]],
            "ids_equal": out.sequences[0, n:].tolist() == run["new_ids"],
            "max_abs_diff_full_vocab": float((ours - full_cache[run["strategy"]]).abs().max()),
        }
        print(run["strategy"], report["runs"][f"cache_{run['strategy']}"], flush=True)
    prov = {
        "repository": "OmriKaduri/vlm-interp",
        "commit": golden["commit"],
        **KIND,
        "official_stack": official_versions(args.official_python),
        **official_meta(args.scratch),
        "model": {"seed": tiny.SEED, "fingerprint": tiny.fingerprint(model)},
        "fixture": "prune_official.json: the describe pass's greedy ids (chat_step_by_step, max_new_tokens=300), "
        "TokenAttentionStore.get_top_k_indices per method (-k 0.05 and -k 28), the question with "
        "topk_indices for max_layer_for_i2t_attn=-1 and min_token_for_i2t_attn_masking 1 / 0; "
        "fastv_official.json: -fastv_layer/-fastv_ratio 2/0.5 and 16/0.05 with layer K's kept positions; "
        "cache_official.json: predict_from_cache for -cache_strategy qs, q, s from the describe pass's kv "
        "cache and attn_over_gen_percentage indices (entries, first position). Every greedy id is kept "
        "(official_new_ids); the first 6 steps as ids and top-16 scores + row sum",
        "measured": report,
    }
    (fx / "provenance.json").write_text(json.dumps(prov, indent=2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", required=True)
    ap.add_argument("--scratch", required=True, help="vlminterp_official.py --scratch output")
    ap.add_argument("--official-python", required=True)
    ap.add_argument("--prune", action="store_true", help="the pruning, FastV and compressed-context fixtures")
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
        **KIND,
        "official_stack": official_versions(args.official_python),
        **official_meta(args.scratch),
        "model": {"seed": tiny.SEED, "fingerprint": tiny.fingerprint(model)},
        "fixture": "knockout_official.json: per run the run_on_coco.py flags, every greedy id of chat_step_by_step "
        "(official_new_ids, max_new_tokens=300), and for the first 6 steps the ids (new_ids) and top-16 "
        "scores + row sum",
        "measured": report,
    }
    (fx / "provenance.json").write_text(json.dumps(prov, indent=2))


if __name__ == "__main__":
    main()
