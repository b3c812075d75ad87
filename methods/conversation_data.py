"""LLaVA-format conversation records as training batches (what ``lmms-plugins viral-train`` reads).

Records: LLaVA's instruction format, a JSON list or JSONL of
  {"image": "relative/path.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                   {"from": "gpt", "value": "..."}, ...]}
with ``image_folder`` as the root of the image paths (``image`` may also be a PIL image). Each
record is encoded by the checkpoint's own processor, with labels on the assistant turns only;
``collate`` pads a batch and keeps the family's own image inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from . import technique
from .families import IMAGE_KEYS, TOKEN_INPUTS


def read_records(path: str) -> list[dict]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"training data {p} not found (expected LLaVA-format JSON or JSONL)")
    text = p.read_text()
    records = (
        json.loads(text)
        if text.lstrip().startswith("[")
        else [json.loads(line) for line in text.splitlines() if line.strip()]
    )
    for i, r in enumerate(records):
        if "conversations" not in r:
            raise ValueError(f"{p}: record {i} has no 'conversations' (LLaVA format: image + conversations)")
    return records


def _turns(conversations: list[dict]) -> list[tuple[str, str]]:
    turns, user = [], None
    for msg in conversations:
        role = msg.get("from", msg.get("role"))
        value = msg.get("value", msg.get("content", ""))
        if role in ("human", "user"):
            user = value
        elif role in ("gpt", "assistant") and user is not None:
            turns.append((user, value))
            user = None
    return turns


# What a processor returns per image (``IMAGE_KEYS``, concatenated over the batch in ``collate``) and per
# token (padded).
TOKEN_KEYS = TOKEN_INPUTS


def encode_conversation(
    processor, image, conversations: list[dict], max_length: int, pad_to_square: bool = False
) -> dict:
    """input_ids, labels (assistant tokens only) and the processor's image inputs for one record
    (``IMAGE_KEYS`` as the processor returns them for one image, ``TOKEN_KEYS`` per token)."""
    image_token = getattr(processor, "image_token", "<image>")
    if pad_to_square and image is not None:
        # LLaVA-1.5's expand2square (the module: the flag of the same name shadows the function)
        image, _ = technique.pad_to_square(image, technique.mean_colour(processor))
    messages = []
    for k, (user, answer) in enumerate(_turns(conversations)):
        text = user.replace(image_token, "").strip()
        content = ([{"type": "image"}] if k == 0 and image is not None else []) + [{"type": "text", "text": text}]
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    if not messages:
        raise ValueError("a record without any (human, gpt) turn")
    images = [image] if image is not None else None

    def ids(text):
        kw = {"images": images} if images else {}
        return processor(text=text, return_tensors="pt", **kw)

    full = ids(processor.apply_chat_template(messages, tokenize=False))
    input_ids = full["input_ids"][0]
    labels = torch.full_like(input_ids, -100)
    for k in range(1, len(messages), 2):  # assistant turn k: tokens between its prompt and its end
        start = ids(processor.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True))[
            "input_ids"
        ].shape[1]
        end = ids(processor.apply_chat_template(messages[: k + 1], tokenize=False))["input_ids"].shape[1]
        labels[start:end] = input_ids[start:end]
    item = {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}
    for key in TOKEN_KEYS:
        if key in full:
            item[key] = full[key][0][:max_length]
    if images:
        item.update({key: full[key] for key in IMAGE_KEYS if key in full})
    return item


class ConversationDataset(torch.utils.data.Dataset):
    """LLaVA-format records, encoded lazily (and remembered) per index."""

    def __init__(
        self,
        records: list[dict],
        processor,
        image_folder: str = "",
        max_length: int = 2048,
        pad_to_square: bool = False,
    ):
        self.records, self.processor, self.folder, self.max_length = (
            records,
            processor,
            Path(image_folder or "."),
            max_length,
        )
        self.pad_to_square = pad_to_square
        self._cache: dict[int, dict] = {}

    def __len__(self):
        return len(self.records)

    def image(self, i: int):
        r = self.records[i]
        if r.get("image") is None:
            return None
        if isinstance(r["image"], Image.Image):
            return r["image"].convert("RGB")
        return Image.open(self.folder / r["image"]).convert("RGB")

    def __getitem__(self, i: int) -> dict:
        if i not in self._cache:
            self._cache[i] = encode_conversation(
                self.processor, self.image(i), self.records[i]["conversations"], self.max_length, self.pad_to_square
            )
        return {**self._cache[i], "index": i}


def collate(items: list[dict], pad_id: int) -> dict:
    n = max(len(it["input_ids"]) for it in items)
    batch = {
        "input_ids": torch.full((len(items), n), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(items), n, dtype=torch.long),
        "labels": torch.full((len(items), n), -100, dtype=torch.long),
        "index": torch.tensor([it["index"] for it in items]),
    }
    for key in TOKEN_KEYS:
        if key in items[0]:
            batch[key] = torch.zeros(len(items), n, dtype=items[0][key].dtype)
    for b, it in enumerate(items):
        m = len(it["input_ids"])
        batch["input_ids"][b, :m] = it["input_ids"]
        batch["attention_mask"][b, :m] = 1
        batch["labels"][b, :m] = it["labels"]
        for key in TOKEN_KEYS:
            if key in batch:
                batch[key][b, :m] = it[key]
    with_image = [it for it in items if "pixel_values" in it]
    if with_image:
        if len(with_image) != len(items):
            raise ValueError(
                "mixing text-only and image samples in one batch is not supported; use batch_size 1 or separate the data"
            )
        for key in IMAGE_KEYS:
            if key in items[0]:
                batch[key] = _concat([it[key] for it in items])
    return batch


def _concat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-image processor outputs joined along dim 0; anyres crops (B, n_crops, ...) zero-padded to the
    largest count (the model reads each image's own crops from ``image_sizes``)."""
    if tensors[0].ndim == 5 and len({t.shape[1] for t in tensors}) > 1:
        most = max(t.shape[1] for t in tensors)
        tensors = [torch.cat([t, t.new_zeros(t.shape[0], most - t.shape[1], *t.shape[2:])], dim=1) for t in tensors]
    return torch.cat(tensors)


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch: the same order after a resume. (Not named ``set_epoch``:
    accelerate would drive that with its own iteration counter, which restarts at 0 on resume.)"""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def use_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n
