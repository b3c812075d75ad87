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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", required=True)
    ap.add_argument("--scratch", required=True, help="vlminterp_knockout.py --scratch output")
    ap.add_argument("--official-python", required=True)
    args = ap.parse_args()
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
    versions = subprocess.run(
        [args.official_python, "-c", "import torch, transformers, importlib.metadata as m; "
         "print(torch.__version__, transformers.__version__, m.version('llava-torch'))"],
        capture_output=True, text=True, check=True).stdout.split()
    prov = {
        "repository": "OmriKaduri/vlm-interp",
        "commit": golden["commit"],
        "kind": "oracle: official stack (llava-torch LLaVA-1.5, transformers 4.37.2 eager generate) with the "
                "masking rules of modified_llava_files/modeling_llama.py LlamaAttention.forward written out in the "
                "harness; the patched file itself needs the patched generation utils (modified_llava_files/utils.py, "
                "252k chars) to receive its kwargs, and neither could be checked out (no snapshot of the repository)",
        "command": "bash bench/parity/regenerate.sh --vlminterp --python /work/venvs/fresh/bin/python",
        "official_stack": {"torch": versions[0], "transformers": versions[1], "llava-torch": versions[2],
                           "attn_implementation": "eager", "dtype": "float32", "device": "cpu"},
        "harness_sha256": {p: sha256(HERE / p) for p in ("vlminterp_knockout.py", "cpu_shim.py", "tiny_llava15.py")},
        "model": {"seed": tiny.SEED, "fingerprint": tiny.fingerprint(model)},
        "fixture": "knockout_official.json: per run the flags, the 6 greedy ids, per step top-16 scores + row sum",
        "measured": report,
    }
    (fx / "provenance.json").write_text(json.dumps(prov, indent=2))


if __name__ == "__main__":
    main()
