"""``llava_pm``'s loglikelihood path against the official first-token scoring (ShunqiM/PM @ 58c2c0f).

The paper's POPE and MME numbers are read from the first answer token: the official QA path
(model_generate.py:557-581) generates on the magnified image, takes the first step's scores (T=1, no
top-k: the raw logits), and ``calibrate_label_dict`` / ``get_prob_from_logits`` (utils/metrics.py) turn
them into p_y = [P(yes), P(no)] over the top 10 tokens; the answer is "yes" if P(yes) > P(no). Our
``pm_official`` tasks score the same thing through lmms-eval's loglikelihood: one request per answer
word, the lower loss wins (task_configs/pm_official/utils.py).

``first_token.json`` (bench/parity/pm_official.py, official stack) holds, per fixture case, the
official scores on the original image, on the magnified image and their ``--resample_cd`` contrast,
with the stand-in vocabulary's answer words (``tiny_llava15.ANSWER_WORDS``: "Yes", "No" and the case
variant "yes"). Here the registered ``llava_pm`` class is built as lmms-eval builds it
(``get_model("llava_pm", force_simple=True).create_from_arg_string("pretrained=...,preset=official_*")``)
on a checkpoint directory of the same tiny model (``tiny_llava15.save_lmms_checkpoint``, fingerprint
checked), and answers lmms-eval loglikelihood ``Instance``s for " Yes" and " No": the whole wrapper path
(parameters and presets, lmms-eval's prompt and label masking, the recording processor, the request,
PM's map and magnification, the teacher-forced forward, lmms-eval's loss) is what is compared.

Tolerance: the logits agree to ~1e-5 (tests/test_parity_pm.py); a log-probability is a difference of
two such values, so LOGP_ATOL = 2 x its LOGIT_ATOL.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _parity_wrappers import Wrappers, loglikelihood
from lmms_eval_plugins.testing import load_parity_script

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "official" / "pm"
LOGP_ATOL = 2e-4
CASES = ["wide_p0_pope", "square_p1_mme", "tall_p0_mme", "wide_p1_pope", "square_p0_pope_iter1", "wide_p0_pope_exit"]
# in CI the cases of distinct regimes (magnification flips the official answer; "No" outside the top 10; a case
# variant scored; the max_iter=1 exit); the other two (a second prompt, the threshold exit) with PARITY_FULL=1
CI_CASES = ["wide_p0_pope", "square_p1_mme", "tall_p0_mme", "square_p0_pope_iter1"]
# the fixture settings as llava_pm model_args (run_llava_pm.sh flags; the other two exits as in test_parity_pm.py);
# precision=fp32: the fixtures are the official code run in fp32, so the presets' fp16 steps are off
MODEL_ARGS = {
    "pope": "preset=official_pope,precision=fp32",
    "mme": "preset=official_mme,precision=fp32",
    "pope_iter1": "preset=official_pope,precision=fp32,max_iter=1",
    "pope_exit": "preset=official_pope,precision=fp32,beta=4.9",
}

pytestmark = pytest.mark.skipif(not (FIX / "first_token.json").exists(), reason="first-token fixtures not generated")


@pytest.fixture(scope="module")
def tiny():
    return load_parity_script("tiny_llava15")


@pytest.fixture(scope="module")
def golden():
    return json.loads((FIX / "first_token.json").read_text())


def load_task_utils():
    """The pm_official tasks' utils.py (lmms-eval loads it by path, as here), for their answer rule."""
    from lmms_eval_plugins.paths import tasks_dir

    path = tasks_dir() / "pm_official" / "utils.py"
    spec = importlib.util.spec_from_file_location("pm_official_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def task_utils():
    return load_task_utils()


@pytest.fixture(scope="module")
def wrappers(tiny, golden, tmp_path_factory):
    return Wrappers(tiny, golden["provenance"], tmp_path_factory.mktemp("pm_first_token"))


def ask(lm, tiny, case: dict, answers=(" Yes", " No")) -> tuple[list, list]:
    """lmms-eval's loglikelihood requests for the case's question and each answer, as the pm_official
    multiple_choice tasks send them (the choice after the default target delimiter " ")."""
    image = Image.open(FIX / f"image_{case['image']}.png").convert("RGB")
    question = tiny.words(case["prompt"]["after"][: -len(tiny.ASSISTANT_IDS)])
    return loglikelihood(lm, image, question, answers)


def answer_id(tiny, answer: str) -> int:
    (i,) = [i for i, w in tiny.ANSWER_WORDS.items() if w == answer.strip()]
    return i


def check_requests(tiny, case: dict, seen: list, answers=(" Yes", " No")) -> None:
    """Each request is the fixture's prompt ids + the answer's id, the prompt ending where the labels start,
    and PM magnified the image the official code magnified, after as many map passes."""
    prompt = tiny.hf_ids(case["prompt"]["before"], case["prompt"]["after"])[0].tolist()
    for (req, _, mag), answer in zip(seen, answers):
        assert req.input_ids[0].tolist() == prompt + [answer_id(tiny, answer)]
        assert req.prompt_len == len(prompt)
        assert len(mag.search.raw) == case["passes"], "map passes (exit decision)"
        assert hashlib.sha256(np.asarray(mag.image).tobytes()).hexdigest() == case["magnified_sha256"], (
            "the magnified image"
        )


def official_kept(tiny, record: dict, key: str) -> int | None:
    """The id the official rule scores for ``key`` ("yes" / "no"): the most probable top-10 id whose word,
    lower-cased and stripped, is ``key`` (calibrate_label_dict keeps the first); None if none is there."""
    return next((i for i in record["top10"] if tiny.word(i).lower().strip() == key), None)


def check_scores(tiny, results: list, record: dict, what: str) -> None:
    """Our (loss, is_greedy) for " Yes" and " No" against one official score record."""
    (loss_yes, _), (loss_no, _) = results
    for loss, word in ((loss_yes, "Yes"), (loss_no, "No")):  # the whole distribution at the answer's id
        want = record["logprob"][str(answer_id(tiny, word))]
        assert -loss == pytest.approx(want, abs=LOGP_ATOL), f"{what}: log P({word})"
    for index, (key, loss, word) in enumerate((("yes", loss_yes, "Yes"), ("no", loss_no, "No"))):
        kept, p = official_kept(tiny, record, key), record["p_y"][index]
        if kept == answer_id(tiny, word):  # the official p_y entry is the probability of our answer token
            assert np.exp(-loss) == pytest.approx(p, rel=LOGP_ATOL), f"{what}: official p_y[{key}]"
        elif kept is None:  # outside the top 10: the official rule scores 0
            assert p == 0.0
        else:  # a more probable case variant is scored instead (the official rule, not ours)
            assert p == pytest.approx(np.exp(record["logprob"][str(kept)]), rel=1e-6)
    # is_greedy is not compared: lmms-eval 0.7.3's llava_hf loglikelihood compares the argmax at each
    # continuation position with the token at that same position (one position late), and no task here reads it


@pytest.mark.parametrize("name", CASES if os.environ.get("PARITY_FULL") else CI_CASES)
def test_loglikelihood_matches_the_official_first_token_scores(wrappers, tiny, golden, task_utils, name):
    """llava_pm preset=official_* through lmms-eval's loglikelihood: the request is the fixture's prompt + the
    answer, the map search and the magnified image are the official ones, log P(Yes) and log P(No) of the
    first answer token equal the official first-step distribution's (within LOGP_ATOL), the official p_y
    entries that score our answer tokens equal our probabilities, and the pm_official tasks' answer rule
    (lower loss) gives the official answer in every case, including the three where the official top-10 rule
    scores another id (tall_p0_mme: the variant "yes" ranks above "Yes") or 0 ("No" outside the top 10 in
    square_p1_mme and square_p0_pope_iter1)."""
    case = golden["cases"][name]
    lm = wrappers.get("llava_pm", MODEL_ARGS[case["settings"]], case["prompt"]["before"])
    results, seen = ask(lm, tiny, case)
    check_requests(tiny, case, seen)
    check_scores(tiny, results, case["magnified"], name)
    assert task_utils.first_token_answer(results) == case["magnified"]["answer"]


@pytest.mark.parametrize("name", ["wide_p0_pope"])
def test_resample_cd_matches_the_official_contrast(wrappers, tiny, golden, task_utils, name):
    """llava_pm resample_cd=1.0 (the official --resample_cd): the loglikelihood scores the contrast
    magnified + cd x (magnified - original) of the first-step logits, as model_generate.py:572-579."""
    case = golden["cases"][name]
    record = case["resample_cd"]
    args = f"{MODEL_ARGS[case['settings']]},resample_cd={record['cd']}"
    lm = wrappers.get("llava_pm", args, case["prompt"]["before"])
    results, seen = ask(lm, tiny, case)
    check_requests(tiny, case, seen)
    check_scores(tiny, results, record, f"{name} resample_cd")
    assert task_utils.first_token_answer(results) == record["answer"]


def test_pm_changes_the_official_answer_somewhere(golden):
    """The fixture is not degenerate: both answers occur, magnification changes an official answer
    (wide_p0_pope: "no" on the original image, "yes" on the magnified one), and the official rule's three
    regimes (our token scored, a variant scored, 0) all occur."""
    cases = golden["cases"].values()
    assert {c["magnified"]["answer"] for c in cases} == {"yes", "no"}
    assert any(c["original"]["answer"] != c["magnified"]["answer"] for c in cases)
    assert any(0.0 in c["magnified"]["p_y"] for c in cases)
    assert any(
        c["magnified"]["top10"].index(27600) < c["magnified"]["top10"].index(9721)
        for c in cases
        if 9721 in c["magnified"]["top10"] and 27600 in c["magnified"]["top10"]
    )


def test_provenance(golden, tiny):
    prov = golden["provenance"]
    assert prov["commit"].startswith("58c2c0f") and len(prov["commit"]) == 40
    assert any(line.startswith("transformers==4.37") for line in prov["official_stack"]["pip_freeze"])
    assert json.loads(prov["tokenizer"].split("answer words ", 1)[1]) == {
        str(k): v for k, v in tiny.ANSWER_WORDS.items()
    }
