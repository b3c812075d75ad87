"""Fail, listing the differences, when the running environment is not exactly requirements.lock.

    python .ci/check_lock.py requirements.lock

Every pinned package must be installed at its pinned version, and nothing else may be installed
besides the project itself and the installer's own tools (pip, setuptools, wheel).
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys

OWN = {"lmms-eval-plugins"}
INSTALLER = {"pip", "setuptools", "wheel"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(path: str) -> dict[str, str]:
    pins = {}
    for line in open(path):
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
        if m:
            pins[norm(m.group(1))] = m.group(2)
    return pins


def main(path: str) -> int:
    pins = locked(path)
    have = {norm(d.metadata["Name"]): d.version for d in md.distributions()}
    wrong = [f"{n}: locked {v}, installed {have[n]}" for n, v in sorted(pins.items()) if n in have and have[n] != v]
    missing = [f"{n}=={v}" for n, v in sorted(pins.items()) if n not in have]
    extra = [f"{n}=={v}" for n, v in sorted(have.items()) if n not in pins and n not in OWN | INSTALLER]
    for title, items in (
        ("different version", wrong),
        ("locked but not installed", missing),
        ("installed but not locked", extra),
    ):
        if items:
            print(f"{title}:\n  " + "\n  ".join(items))
    if wrong or missing or extra:
        print(
            f"the environment drifted from {path}: install with `pip install -r {path}` in a fresh virtual environment"
        )
        return 1
    print(f"environment equals {path} ({len(pins)} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "requirements.lock"))
