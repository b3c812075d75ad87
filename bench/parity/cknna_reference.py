"""Golden fixtures of the Platonic Representation Hypothesis metrics (the CKNNA VIRAL plots).

    python bench/parity/cknna_reference.py --official /work/official/platonic-rep \
        --out tests/fixtures/official/cknna [--commit <full hash>]

Runs the reference ``metrics.py`` (minyoungg/platonic-rep @ dcd76ba) unmodified, in our own
venv (it needs only torch for these metrics): its top-level imports of torchaudio and
scikit-learn serve other metrics and are stubbed by ``cpu_shim.stub_modules``. Inputs are fixed
random pairs (related and unrelated features, several sizes), L2-normalised as the reference's
``measure_alignment.compute_score`` does before every metric (measure_alignment.py:55-57),
in float64. Writes inputs.safetensors, cases.json (metric values) and provenance.json.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cpu_shim  # noqa: E402

# (name, n, d_x, d_y, coupling): y = x[:, :d] @ W + noise / coupling (0: unrelated)
PAIRS = [
    ("related_40", 40, 16, 12, 1.0),
    ("weak_64", 64, 32, 24, 0.3),
    ("unrelated_50", 50, 8, 8, 0.0),
    ("related_120", 120, 24, 16, 2.0),
]
TOPKS = (2, 5, 10)


def make_pair(n, dx, dy, coupling, gen):
    x = torch.randn(n, dx, generator=gen, dtype=torch.float64)
    noise = torch.randn(n, dy, generator=gen, dtype=torch.float64)
    if coupling == 0:
        return x, noise
    w = torch.randn(dx, dy, generator=gen, dtype=torch.float64)
    return x, x @ w * coupling + noise


def load_reference(checkout: Path):
    cpu_shim.stub_modules(
        ["torchaudio.functional", "sklearn.cross_decomposition"], **{"sklearn.cross_decomposition": {"CCA": None}}
    )
    spec = importlib.util.spec_from_file_location("platonic_metrics", checkout / "metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, type=Path, help="platonic-rep checkout (or exported tree)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--commit", default="dcd76ba3c950c1b197a2ae8b1c6713535c94ecf9")
    args = ap.parse_args()
    ref = load_reference(args.official).AlignmentMetrics
    gen = torch.Generator().manual_seed(0)
    tensors, cases = {}, []
    for name, n, dx, dy, coupling in PAIRS:
        x, y = make_pair(n, dx, dy, coupling, gen)
        tensors[f"{name}.x"], tensors[f"{name}.y"] = x.contiguous(), y.contiguous()
        xn, yn = torch.nn.functional.normalize(x, p=2, dim=-1), torch.nn.functional.normalize(y, p=2, dim=-1)
        values = {"cka": ref.cka(xn, yn), "unbiased_cka": ref.unbiased_cka(xn, yn)}
        for k in TOPKS:
            values[f"cknna_unbiased_k{k}"] = ref.cknna(xn, yn, topk=k, unbiased=True)
            values[f"cknna_biased_k{k}"] = ref.cknna(xn, yn, topk=k, unbiased=False)
            values[f"mutual_knn_k{k}"] = ref.mutual_knn(xn, yn, topk=k)
        cases.append({"pair": name, "n": n, "values": {k: float(v) for k, v in values.items()}})
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out / "inputs.safetensors"))
    (args.out / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    shim = (HERE / "cpu_shim.py").read_bytes()
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True).stdout.split()
    provenance = {
        "repository": "minyoungg/platonic-rep",
        "commit": args.commit,
        "files": {"metrics.py": hashlib.sha256((args.official / "metrics.py").read_bytes()).hexdigest()},
        "what": "AlignmentMetrics.cka / unbiased_cka / cknna (unbiased and biased) / mutual_knn on L2-normalised float64 pairs",
        "command": "python bench/parity/cknna_reference.py --official <platonic-rep checkout> --out tests/fixtures/official/cknna",
        "shim": {
            "file": "bench/parity/cpu_shim.py",
            "sha256": hashlib.sha256(shim).hexdigest(),
            "used": "stub_modules for torchaudio, sklearn",
        },
        "stack": [p for p in freeze if p.split("==")[0].lower() in ("torch", "numpy")]
        + [f"python=={sys.version.split()[0]}"],
    }
    (args.out / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    print(f"wrote {len(cases)} pairs x {len(cases[0]['values'])} values to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
