"""viral-train in bf16 and fp16 through the CLI on CPU: two steps, finite losses, float32 master weights saved."""

import json

import pytest
import torch

from lmms_eval_plugins.cli import main
from lmms_eval_plugins.testing import build_tiny_llava
from test_viral_train import _data


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_two_low_precision_steps_through_the_cli(dtype, tmp_path):
    ckpt = build_tiny_llava(tmp_path / "base")
    data = _data(tmp_path / "data")
    out = tmp_path / "run"
    rc = main(
        [
            "viral-train",
            "--pretrained",
            str(ckpt),
            "--data",
            str(data),
            "--image-folder",
            str(data.parent / "img"),
            "--output-dir",
            str(out),
            "--dtype",
            dtype,
            "--layer",
            "2",
            "--proj-hidden",
            "16",
            "--lora-r",
            "4",
            "--lora-alpha",
            "8",
            "--batch-size",
            "2",
            "--max-steps",
            "2",
            "--log-every",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor([r["lm_loss"], r["vra_loss"]])).all() for r in rows)
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(out / "vra_projector.safetensors")).values()} == {torch.float32}
