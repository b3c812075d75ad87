"""ShapeWorld task data: prompts, ground truth and the fixed train/test splits.

Prompts are the ones of the real lmms-eval tasks each ShapeWorld task stands for
(POPE, COCO-CHAIR, RefCOCO bbox REC, CountBench, CV-Bench 2D relation), so a model
wrapper sees the same strings here as on the real benchmark.  Every doc is a small
dict (a scene seed plus its ground truth); the image is rendered from the seed.

Splits are fixed by seed families: test docs come from `derive_seed("test", task, i)`
scenes of TEST_WORLD, train docs from `derive_seed("train", task, i)` scenes of
TRAIN_WORLD (the training distribution, with its co-occurrence prior).
"""

from __future__ import annotations

import functools
import json
import random

from .scenes import (
    PARTNER,
    PLURALS,
    SHAPES,
    TRAIN_WORLD,
    WORLDS,
    caption,
    derive_seed,
    sample_scene,
    unique_expressions,
)

# ----------------------------------------------------------------------------- prompts
# lmms_eval/tasks/pope/pope.yaml (default lmms_eval_specific_kwargs)
POPE_QUESTION = "Is there a {shape} in the image?"
POPE_POST_PROMPT = "\nAnswer the question using a single word or phrase."
# lmms_eval/tasks/coco_cap_chair/utils.py
CHAIR_PROMPT = "Please describe this image in detail."
# lmms_eval/tasks/refcoco/utils_rec.py
REC_PROMPT = (
    "Bounding box coordinates are specified in the format (top-left x, top-left y, bottom-right x, bottom-right y). "
    "All values are floating point numbers bounded between 0 and 1. "
    "Please provide the bounding box coordinate of the region this sentence describes: "
)
# lmms_eval/tasks/countbench/countbench.yaml
COUNT_PRE_PROMPT = (
    "Look at the image carefully and count the objects. Answer with just a number, without any additional text. "
)
COUNT_QUESTION = "How many {plural} are there?"
# lmms_eval/tasks/cv_bench (2D relation); the question wording follows CV-Bench's
# "relative positions" template with ShapeWorld's referring expressions.
SPATIAL_PRE_PROMPT = "Note: You only need to respond with {} without providing any additional information.\n"
SPATIAL_QUESTION = (
    "Considering the relative positions of {a} and {b} in the image provided, "
    "where is {a} located with respect to {b}?\nSelect from the following choices.\n(A) {c0}\n(B) {c1}"
)
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}

POPE_RULES = ("random", "popular", "adversarial")
SPLIT_SIZES = {"test": 300, "train": 300}


def pope_text(shape: str) -> str:
    return POPE_QUESTION.format(shape=shape) + POPE_POST_PROMPT


def rec_text(expression: str) -> str:
    return REC_PROMPT + expression


def count_text(shape: str) -> str:
    return COUNT_PRE_PROMPT + COUNT_QUESTION.format(plural=PLURALS[shape])


def spatial_prompt(a: str, b: str, choices) -> str:
    return SPATIAL_QUESTION.format(a=a, b=b, c0=choices[0], c1=choices[1])


def spatial_text(prompt: str, n_choices: int = 2) -> str:
    letters = ", ".join(chr(65 + i) for i in range(n_choices))
    return SPATIAL_PRE_PROMPT.format(letters) + "\n" + prompt


def format_box(box) -> str:
    """The answer format lmms-eval's refcoco_bbox_rec parses: "[x1, y1, x2, y2]" in 0..1."""
    return "[" + ", ".join(f"{min(max(v, 0.0), 1.0):.2f}" for v in box) + "]"


def size_class(objects) -> str:
    sizes = {o.size for o in objects}
    if not sizes:
        return "absent"
    return sizes.pop() if len(sizes) == 1 else "mixed"


# ----------------------------------------------------------------- co-occurrence stats
@functools.lru_cache(maxsize=None)
def train_statistics(n_scenes: int = 4000):
    """Presence frequency of each shape and shape-shape co-occurrence counts, measured on
    training scenes: what POPE's popular/adversarial rules rank negatives by."""
    freq = {s: 0 for s in SHAPES}
    cooc = {a: {b: 0 for b in SHAPES} for a in SHAPES}
    for i in range(n_scenes):
        present = sample_scene(derive_seed("stats", i), TRAIN_WORLD).shapes_present()
        for a in present:
            freq[a] += 1
            for b in present:
                if a != b:
                    cooc[a][b] += 1
    return freq, cooc


def pope_negative(scene, rule: str, rng: random.Random) -> str:
    """POPE's negative sampling: a shape absent from the scene chosen at random, by global
    frequency (popular) or by co-occurrence with the shapes present (adversarial)."""
    present = scene.shapes_present()
    absent = [s for s in SHAPES if s not in present]
    if rule == "random":
        return rng.choice(absent)
    freq, cooc = train_statistics()
    if rule == "popular":
        score = {s: freq[s] for s in absent}
    elif rule == "adversarial":
        score = {s: sum(cooc[p][s] for p in present) for s in absent}
    else:
        raise ValueError(f"unknown POPE rule {rule!r}; valid: {POPE_RULES}")
    best = max(score.values())
    return rng.choice([s for s in absent if score[s] == best])


# --------------------------------------------------------------------------- the docs
def _scene(split: str, family: str, i: int):
    seed = derive_seed(split, family, i)
    world = "test" if split == "test" else "train"
    return seed, world, sample_scene(seed, WORLDS[world])


def pope_docs(rule: str, split: str = "test", n: int | None = None) -> list:
    """n questions over n/2 scenes: one present shape ("yes") and one negative ("no") each.
    The three rules share the scenes and the "yes" questions, as in POPE."""
    n = n or SPLIT_SIZES[split]
    docs = []
    for i in range(n // 2):
        seed, world, scene = _scene(split, "pope", i)
        rng = random.Random(derive_seed(split, "pope-q", i))
        yes_shape = rng.choice(scene.shapes_present())
        rule_rng = random.Random(derive_seed(split, "pope-neg", rule, i))
        no_shape = pope_negative(scene, rule, rule_rng)
        for shape, answer in ((yes_shape, "yes"), (no_shape, "no")):
            present_partner = PARTNER[shape] in scene.shapes_present()
            docs.append(
                {
                    "question_id": f"{split}-pope-{rule}-{i}-{answer}",
                    "scene_seed": seed,
                    "world": world,
                    "question": POPE_QUESTION.format(shape=shape),
                    "answer": answer,
                    "object": shape,
                    "category": rule,
                    "size_class": size_class([o for o in scene.objects if o.shape == shape]),
                    "partner_present": present_partner,
                    "scene": json.dumps(scene.to_dict()),
                }
            )
    return docs


def chair_docs(split: str = "test", n: int | None = None) -> list:
    n = n or SPLIT_SIZES[split]
    docs = []
    for i in range(n):
        seed, world, scene = _scene(split, "chair", i)
        docs.append(
            {
                "question_id": i,
                "scene_seed": seed,
                "world": world,
                "question": CHAIR_PROMPT,
                "gt_object": scene.shapes_present(),
                "reference_caption": caption(scene),
                "n_small": sum(o.size == "small" for o in scene.objects),
                "scene": json.dumps(scene.to_dict()),
            }
        )
    return docs


def rec_docs(split: str = "test", n: int | None = None) -> list:
    n = n or SPLIT_SIZES[split]
    docs = []
    i = 0
    while len(docs) < n:
        seed, world, scene = _scene(split, "rec", i)
        rng = random.Random(seed)
        k = rng.randrange(len(scene.objects))
        expressions = unique_expressions(scene, k)
        if expressions:
            docs.append(
                {
                    "question_id": len(docs),
                    "scene_seed": seed,
                    "world": world,
                    "answer": rng.choice(expressions),
                    "bbox": scene.normalised_box(k),
                    "size_class": scene.objects[k].size,
                    "scene": json.dumps(scene.to_dict()),
                }
            )
        i += 1
    return docs


def count_docs(split: str = "test", n: int | None = None) -> list:
    n = n or SPLIT_SIZES[split]
    docs = []
    for i in range(n):
        seed, world, scene = _scene(split, "count", i)
        rng = random.Random(seed)
        present = scene.shapes_present()
        # mostly present shapes (counts 1-3), sometimes an absent one (answer 0)
        shape = rng.choice(present) if rng.random() < 0.85 else rng.choice([s for s in SHAPES if s not in present])
        objs = [o for o in scene.objects if o.shape == shape]
        docs.append(
            {
                "question_id": i,
                "scene_seed": seed,
                "world": world,
                "question": COUNT_QUESTION.format(plural=PLURALS[shape]),
                "object": shape,
                "number": str(len(objs)),
                "size_class": size_class(objs),
                "scene": json.dumps(scene.to_dict()),
            }
        )
    return docs


def spatial_example(scene, rng: random.Random):
    """(prompt, answer letter, relation, (i, j), choices) for a random separated pair with
    unique referring expressions, or None if the scene has none."""
    rels = list(scene.relations())
    rng.shuffle(rels)
    for i, rel, j in rels:
        ei, ej = unique_expressions(scene, i), unique_expressions(scene, j)
        if not ei or not ej:
            continue
        a, b = rng.choice(ei), rng.choice(ej)
        choices = [rel, OPPOSITE[rel]]
        rng.shuffle(choices)
        letter = "A" if choices[0] == rel else "B"
        return spatial_prompt(a, b, choices), letter, rel, (i, j), choices
    return None


def spatial_docs(split: str = "test", n: int | None = None) -> list:
    n = n or SPLIT_SIZES[split]
    docs = []
    i = 0
    while len(docs) < n:
        seed, world, scene = _scene(split, "spatial", i)
        rng = random.Random(seed)
        ex = spatial_example(scene, rng)
        i += 1
        if ex is None:
            continue
        prompt, letter, rel, (a, b), choices = ex
        docs.append(
            {
                "idx": len(docs),
                "scene_seed": seed,
                "world": world,
                "prompt": prompt,
                "choices": choices,
                "answer": f"({letter})",
                "relation": rel,
                "type": "2D",
                "task": "Relation",
                "source": "ShapeWorld",
                "size_class": size_class([scene.objects[a], scene.objects[b]]),
                "scene": json.dumps(scene.to_dict()),
            }
        )
    return docs


def render_doc(doc):
    """The doc's image (336 px RGB), re-rendered from its seed."""
    return sample_scene(int(doc["scene_seed"]), WORLDS[doc["world"]]).render()


def vocabulary_texts() -> list:
    """Every string the tasks and training put in front of the model or expect back."""
    texts = [CHAIR_PROMPT, REC_PROMPT, COUNT_PRE_PROMPT, SPATIAL_PRE_PROMPT.format("A, B"), "USER: ASSISTANT:"]
    texts += [pope_text(s) for s in SHAPES] + [count_text(s) for s in SHAPES]
    texts += [SPATIAL_QUESTION.format(a="the", b="the", c0=r, c1=OPPOSITE[r]) for r in OPPOSITE]
    texts += ["yes no (A) (B) A B , and ."]
    return texts
