"""A three-document yes/no task over solid-colour images, for end-to-end CLI tests."""

import os
import time

from PIL import Image


def doc_to_visual(doc):
    # TINY_SLOW_DOC=k makes document k hang, so a test can kill a run part-way
    if os.environ.get("TINY_SLOW_DOC") == str(doc["id"]):
        time.sleep(300)
    return [Image.new("RGB", (48, 40), tuple(doc["rgb"]))]


def no_visual(doc):
    return []


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return f"is there a {doc['color']} square in the image?"


def doc_to_target_index(doc):
    return 0 if doc["answer"] == "yes" else 1


def process_results(doc, results):
    return {"exact": float(results[0].strip().lower().startswith(doc["answer"]))}


def sized_visual(doc):
    """An image of the document's own size, with a lighter square, so images differ in size and content."""
    w, h = doc["size"]
    image = Image.new("RGB", (w, h), tuple(doc["rgb"]))
    image.paste((230, 230, 230), (w // 4, h // 4, w // 2, h // 2))
    return [image]


def own_question(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
