"""`lmms-plugins env`: versions, devices and paths to paste into a bug report, and the known
incompatibilities checked (exit code 1 with the fix when one is found), like `transformers env`.

`lmms-plugins compare --run` runs the same checks before starting lmms-eval.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import platform
import sys

DIST = "lmms-eval-plugins"
REPORTED = (
    "torch",
    "torchvision",
    "transformers",
    "lmms-eval",
    "accelerate",
    "peft",
    "datasets",
    "huggingface-hub",
    "filelock",
    "numpy",
    "pytest",
)


def version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def problems() -> list[str]:
    """Known incompatibilities of the installed environment, each with its fix (empty: all good)."""
    from packaging.requirements import Requirement

    found = []
    # lmms-eval 0.7.3's evaluator imports filelock's private module `filelock._api`, which filelock 4.3
    # removed: every evaluation then dies before the first request and the CLI still exits 0.
    if version("filelock") and importlib.util.find_spec("filelock._api") is None:
        found.append(
            f"filelock {version('filelock')} has no `filelock._api`, which lmms-eval 0.7.3 imports (every run fails); "
            'fix: pip install "filelock<4.3" (or install from requirements.lock)'
        )
    lmms = version("lmms-eval")
    if lmms is None:
        found.append("lmms-eval is not installed; fix: pip install -r requirements.lock && pip install -e .")
    elif not lmms.startswith("0.7."):
        found.append(f'lmms-eval {lmms} is outside the supported 0.7.x; fix: pip install "lmms-eval>=0.7.3,<0.8"')
    # Every range the package declares (transformers>=5, ...), checked against what is installed.
    for line in md.requires(DIST) or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra (e.g. [test]) or another platform's requirement
        have = version(req.name)
        if have is None:
            found.append(f'{req.name} is not installed; fix: pip install "{req}"')
        elif req.specifier and not req.specifier.contains(have, prereleases=True):
            found.append(f'{req.name} {have} is outside the supported range {req.specifier}; fix: pip install "{req}"')
    return found


def report() -> list[tuple[str, str]]:
    rows = [("python", sys.version.split()[0]), ("platform", platform.platform())]
    rows += [(dist, version(dist) or "not installed") for dist in (DIST, *REPORTED)]
    try:
        import torch

        cuda = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "none"
        rows += [("torch threads", str(torch.get_num_threads())), ("cuda devices", cuda)]
    except ImportError:
        pass
    try:
        from ..paths import named_paths

        rows += [(f"path {name}", str(path)) for name, path in named_paths().items()]
    except FileNotFoundError as err:
        rows.append(("paths", f"MISSING: {err}"))
    return rows


def check_or_exit() -> None:
    """Stop with the fixes when the environment is known to break lmms-eval runs (used by compare --run)."""
    found = problems()
    if found:
        raise SystemExit("this environment cannot run lmms-eval correctly:\n" + "\n".join(f"  - {p}" for p in found))


def main(args) -> int:
    rows = report()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    found = problems()
    print()
    if found:
        print("PROBLEMS (each with its fix):")
        for p in found:
            print(f"  - {p}")
        return 1
    print("no known incompatibility found")
    return 0


def register(sub) -> None:
    p = sub.add_parser("env", help="versions, devices, paths; exits 1 with the fix on a known incompatibility")
    p.set_defaults(func=main)
