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
import warnings
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


# ---------------------------------------------------------------------------------------
# The official data path of LLaVA-1.5 / VIRAL's ``--version v1`` (llava/train/train.py, llava/conversation.py,
# llava/mm_utils.py at cvlab-kaist/VIRAL adc0791, as in haotian-liu/LLaVA), step by step
# ---------------------------------------------------------------------------------------

# conv_vicuna_v1 (conversation.py:253-263), what ``--version v1`` selects (train.py:1148-1149)
V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
V1_ROLES = ("USER", "ASSISTANT")
V1_SEP, V1_SEP2 = " ", "</s>"
IGNORE_INDEX = -100


def v1_messages(conversations: list[dict], has_image: bool, image_token: str = "<image>") -> list[tuple[str, str]]:
    """(role, text) as ``preprocess_multimodal`` + ``preprocess_v1`` build them: the image placeholder moved to
    the front of the turn that holds it (``"<image>\n" + rest``, train.py:317-321), a first turn not from the
    human dropped (train.py:425-427); roles must alternate from the human (train.py:432)."""
    source = [dict(m) for m in conversations]
    if source and source[0].get("from", source[0].get("role")) not in ("human", "user"):
        source = source[1:]
    out = []
    for j, m in enumerate(source):
        value = m.get("value", m.get("content", ""))
        if has_image and image_token in value:
            value = (image_token + "\n" + value.replace(image_token, "").strip()).strip()
        role = V1_ROLES[0] if m.get("from", m.get("role")) in ("human", "user") else V1_ROLES[1]
        if role != V1_ROLES[j % 2]:
            raise ValueError(f"turn {j} is from {role}: LLaVA's v1 conversations alternate USER / ASSISTANT")
        out.append((role, value))
    return out


def v1_prompt(messages: list[tuple[str, str]]) -> str:
    """``Conversation.get_prompt`` for SeparatorStyle.TWO (conversation.py:56-64): system + sep, then
    ``role: message`` closed by sep (" ") after the user and sep2 ("</s>") after the assistant."""
    text = V1_SYSTEM + V1_SEP
    for i, (role, message) in enumerate(messages):
        text += f"{role}: {message}{(V1_SEP, V1_SEP2)[i % 2]}" if message else f"{role}:"
    return text


def tokenize_with_image(tokenizer, text: str, image_id: int, image_token: str = "<image>") -> list[int]:
    """``tokenizer_image_token`` (mm_utils.py): each chunk between placeholders tokenized on its own, every
    chunk's BOS dropped but the first's, one ``image_id`` per placeholder. (The chunk after an image starts
    with the dummy-prefix piece, Vicuna's 29871, before its ``\n``: part of the official ids.)"""
    chunks = [tokenizer(c).input_ids for c in text.split(image_token)]
    bos = tokenizer.bos_token_id
    offset = 1 if chunks and chunks[0] and chunks[0][0] == bos else 0
    ids = [bos] if offset else []
    for k, chunk in enumerate(chunks):
        if k:
            ids.append(image_id)
        ids.extend(chunk[offset:])
    return ids


def v1_labels(tokenizer, prompt: str, ids: list[int], has_image: bool, image_id: int) -> list[int]:
    """``preprocess_v1``'s masking (train.py:455-490), quirks included: per round (the prompt split at
    "</s>"), its length from tokenizing the round alone (its BOS stands for the "</s>" it lost), the
    instruction (through "ASSISTANT: ") masked with length ``len(tokens) - 2`` (BOS and the trailing "▁"
    that merges into the answer's first piece); for rounds after the first, one less each for non-legacy
    tokenizers (``USER`` after ``</s>`` is one piece there, ``▁US ER`` alone; tokenizers >= 0.14 always here).
    The BOS and everything after the last round are masked; if the counted length differs from the number
    of non-pad ids, the whole sample is masked (the official "tokenization mismatch ... (ignored)")."""
    labels = list(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    total = sum(1 for i in ids if i != pad)
    sep = V1_SEP + V1_ROLES[1] + ": "
    legacy = bool(getattr(tokenizer, "legacy", True))

    def length(text):
        return len(tokenize_with_image(tokenizer, text, image_id) if has_image else tokenizer(text).input_ids)

    cur = 1
    labels[:cur] = [IGNORE_INDEX] * cur
    for i, rnd in enumerate(prompt.split(V1_SEP2)):
        if rnd == "":
            break
        parts = rnd.split(sep)
        if len(parts) != 2:
            break
        round_len, instruction_len = length(rnd), length(parts[0] + sep) - 2
        if i != 0 and not legacy:
            round_len, instruction_len = round_len - 1, instruction_len - 1
        labels[cur : cur + instruction_len] = [IGNORE_INDEX] * len(labels[cur : cur + instruction_len])
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
    if cur < (_model_max_length(tokenizer) or float("inf")) and cur != total:
        warnings.warn(
            f"tokenization mismatch: {cur} vs. {total} (the sample is ignored, as the official preprocess_v1 does)",
            stacklevel=2,
        )
        labels = [IGNORE_INDEX] * len(labels)
    return labels


def _model_max_length(tokenizer) -> int | None:
    """The tokenizer's model_max_length, None when unset (transformers' placeholder is 1e30)."""
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if n and n < 10**9 else None


def encode_v1(tokenizer, conversations: list[dict], has_image: bool, image_id: int = -200):
    """(prompt, input_ids, labels) of one record as the official ``LazySupervisedDataset`` gives them
    (``image_id`` in place of IMAGE_TOKEN_INDEX -200: one id per image, before expansion)."""
    prompt = v1_prompt(v1_messages(conversations, has_image))
    if has_image:
        ids = tokenize_with_image(tokenizer, prompt, image_id)
    else:
        limit = _model_max_length(tokenizer)  # train.py:443-449 truncates text-only records at model_max_length
        ids = tokenizer(prompt, **({"truncation": True, "max_length": limit} if limit else {})).input_ids
    return prompt, ids, v1_labels(tokenizer, prompt, ids, has_image, image_id)


def encode_conversation_v1(processor, image, conversations: list[dict], max_length: int, pad_to_square: bool = False):
    """``encode_conversation`` for ``conversation="v1"``: the official ids and labels (``encode_v1``) with the
    single image id expanded to the processor's image tokens (labels -100 there), and its image inputs."""
    tokenizer = processor.tokenizer
    image_token = getattr(processor, "image_token", "<image>")
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    if pad_to_square and image is not None:
        image, _ = technique.pad_to_square(image, technique.mean_colour(processor))
    _, ids, labels = encode_v1(tokenizer, conversations, image is not None, image_id)
    item = {}
    if image is not None:
        full = processor(text=image_token, images=[image], return_tensors="pt")
        n_image = int((full["input_ids"][0] == image_id).sum())
        expanded_ids, expanded_labels = [], []
        for i, lab in zip(ids, labels):
            expanded_ids += [i] * (n_image if i == image_id else 1)
            expanded_labels += [IGNORE_INDEX] * n_image if i == image_id else [lab]
        ids, labels = expanded_ids, expanded_labels
        item.update({key: full[key] for key in IMAGE_KEYS if key in full})
    item["input_ids"] = torch.tensor(ids[:max_length])
    item["labels"] = torch.tensor(labels[:max_length])
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
        conversation: str = "processor",
    ):
        if conversation not in ("processor", "v1"):
            raise ValueError(
                f"conversation={conversation!r}: 'processor' (its chat template) or 'v1' (LLaVA's official v1)"
            )
        self.encode = encode_conversation_v1 if conversation == "v1" else encode_conversation
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
            self._cache[i] = self.encode(
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
