"""A tiny Llama-style SentencePiece tokenizer for the VIRAL data-path fixture (Vicuna's is not available here).

Built piece by piece (no training, so the same file on every machine): a BPE model with Llama's settings
(byte fallback, a dummy prefix, no whitespace normalisation, <unk>=0 <s>=1 </s>=2, then the 256 byte
pieces), whole-word pieces ``▁word`` reached by a chain of merges for the words of the fixture's
conversations and LLaVA's v1 system prompt, and the property of Vicuna's vocabulary that LLaVA's
``preprocess_v1`` counts on: ``USER`` after ``</s>`` is one piece, ``▁USER`` at the start of a text two
(``▁US``, ``ER``). Written with transformers' copy of sentencepiece's model proto.
"""

from __future__ import annotations

import json
from pathlib import Path

WORDS = (
    (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. "
        "What is in the image? How many shapes are there? Is there a red circle left of the square? Describe it. "
        "There are three shapes. Yes, a red circle. No. The square is blue and small. Two. "
        "Which colour is the triangle? green ASSISTANT"
    )
    .replace("?", " ?")
    .replace(".", " .")
    .replace(",", " ,")
    .replace("'", " '")
    .split()
)
CHARS = sorted(set("".join(WORDS)) | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?:'!"))


def pieces() -> list[tuple[str, float]]:
    """(piece, score) after the special and byte pieces; a higher score merges first."""
    out: dict[str, float] = {}
    # Vicuna's USER quirk: US and ER merge first, then ▁US; USER only from US + ER (no ▁USER piece)
    for p, s in (("US", -1.0), ("ER", -2.0), ("▁U", -3.0), ("▁US", -4.0), ("USER", -5.0)):
        out[p] = s
    rank = 10.0
    for w in sorted(set(WORDS)):
        word = "▁" + w
        for k in range(2, len(word) + 1):  # every prefix: BPE reaches the word by one merge per character
            if word[:k] not in out:
                rank += 1
                out[word[:k]] = -rank - 0.01 * k
    for c in ["▁", *CHARS]:
        if c not in out:
            rank += 1
            out[c] = -rank - 1000.0
    return sorted(out.items(), key=lambda kv: -kv[1])


def write(out_dir: Path, legacy: bool) -> Path:
    from transformers.convert_slow_tokenizer import import_protobuf

    pb = import_protobuf()  # transformers' copy of sentencepiece's proto (one descriptor pool with the tokenizer's)

    m = pb.ModelProto()
    t = m.trainer_spec
    t.model_type = pb.TrainerSpec.BPE
    t.byte_fallback = True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = 0, 1, 2, -1
    t.vocab_size = 3 + 256 + len(pieces())
    n = m.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = True
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    for text, kind in (
        ("<unk>", pb.ModelProto.SentencePiece.UNKNOWN),
        ("<s>", pb.ModelProto.SentencePiece.CONTROL),
        ("</s>", pb.ModelProto.SentencePiece.CONTROL),
    ):
        p = m.pieces.add()
        p.piece, p.score, p.type = text, 0.0, kind
    for b in range(256):
        p = m.pieces.add()
        p.piece, p.score, p.type = f"<0x{b:02X}>", 0.0, pb.ModelProto.SentencePiece.BYTE
    for text, score in pieces():
        p = m.pieces.add()
        p.piece, p.score = text, score
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(m.SerializeToString())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "legacy": legacy,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "padding_side": "right",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n"
    )
    return out_dir


if __name__ == "__main__":
    import sys

    for legacy in (False, True):
        write(Path(sys.argv[1]) / ("legacy" if legacy else "nonlegacy"), legacy)


def vocab() -> list[str]:
    """Every piece in id order: <unk> <s> </s>, the 256 byte pieces, then ``pieces()``."""
    return ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *[p for p, _ in pieces()]]


def merges() -> list[tuple[str, str]]:
    """The BPE merges that reproduce SentencePiece's segmentation in a ``tokenizers`` BPE (how transformers
    converts a SentencePiece model): every split of a piece into two pieces, by the merged piece's rank."""
    ids = {p: i for i, p in enumerate(vocab())}
    out = []
    for p, _ in pieces():
        splits = [(p[:k], p[k:]) for k in range(1, len(p)) if p[:k] in ids and p[k:] in ids]
        out += sorted(splits, key=lambda ab: (ids[ab[0]], ids[ab[1]]))
    return out


def hf_tokenizer(legacy: bool):
    """The same tokenizer in transformers >= 5 (a ``tokenizers`` BPE with byte fallback; legacy=False prepends
    ``▁`` to the first piece of a text only, as the slow non-legacy tokenizer does). Built from the piece list:
    this environment's protobuf cannot read a ``tokenizer.model`` (see docs/viral.md)."""
    from transformers import LlamaTokenizer

    return LlamaTokenizer(
        vocab={p: i for i, p in enumerate(vocab())}, merges=merges(), legacy=legacy, add_bos_token=True
    )
