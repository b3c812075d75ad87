"""Run official CUDA/fp16 research code unmodified on CPU in fp32 (imported before it).

Written by us, applied at runtime, so the official files stay byte-identical to their commit:

- every ``"cuda"`` device given to ``Tensor.to`` / ``Tensor.cuda`` / ``Module.to`` /
  ``Module.cuda`` or to a tensor factory (``torch.ones(..., device="cuda")``) becomes ``"cpu"``;
- ``Tensor.half()`` / ``Module.half()`` keep float32 (the parity fixtures are fp32);
- ``stub_modules(names)`` registers empty modules for imports the harness never calls
  (e.g. PAI's ``model_loader.py`` imports the MiniGPT-4 and Shikra loaders at the top).

Nothing else is changed. ``SHIM_SHA256`` (in provenance.json) is this file's hash.
"""

from __future__ import annotations

import functools
import sys
import types

import torch


def _cpu(device):
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"
    return device


def _fix(args, kwargs):
    args = tuple(_cpu(a) if isinstance(a, (str, torch.device)) else a for a in args)
    if "device" in kwargs:
        kwargs["device"] = _cpu(kwargs["device"])
    return args, kwargs


def _wrap(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args, kwargs = _fix(args, kwargs)
        return fn(*args, **kwargs)

    return wrapper


def install() -> None:
    if getattr(torch, "_parity_cpu_shim", False):
        return
    torch._parity_cpu_shim = True
    torch.Tensor.to = _wrap(torch.Tensor.to)
    torch.nn.Module.to = _wrap(torch.nn.Module.to)
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.half = lambda self, *a, **k: self
    torch.nn.Module.half = lambda self, *a, **k: self
    for name in (
        "ones",
        "zeros",
        "full",
        "empty",
        "tensor",
        "arange",
        "as_tensor",
        "randn",
        "rand",
        "ones_like",
        "zeros_like",
    ):
        setattr(torch, name, _wrap(getattr(torch, name)))


def stub_modules(names, **attrs) -> None:
    """Register empty modules (and parents) for imports that are never called."""
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            sub = ".".join(parts[:i])
            if sub not in sys.modules:
                sys.modules[sub] = types.ModuleType(sub)
        for key, value in attrs.get(name, {}).items():
            setattr(sys.modules[name], key, value)
