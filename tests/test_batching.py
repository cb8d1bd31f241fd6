"""Items of different scans batched together: each answer must come from its own image.

``Segmenter.run_items`` is what a serve replica calls on the (slice, prompt) items of concurrent
requests; it shares one vision pass between items of the same square. These tests mix different
real CT slices and a blank image under one prompt (the case where a key of (slice, window)
handed one request another's mask) and check each answer against the image run alone, and
that an answer does not depend on what else is in its batch.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from medsam3.inference import Preprocessor, Segmenter, inference_config
from medsam3.io.scan import read_scan
from tests.builders import SAMMED2D

SLICES = ["amos_0004_75.png", "amos_0006_90.png", "s0114_111.png", "s0619_32.png"]
# a few queries per slice pass this with the random tiny model: partial masks that differ by image
THRESHOLD = 0.2535
# Batched and single float32 matmuls on CPU differ in the last bits: scores agree to 1e-5 and a
# mask may flip only pixels whose logit is within rounding of 0 (at most 0.1 % of the pixels).
SCORE_TOL, PIXEL_TOL = 1e-5, 1e-3


@pytest.fixture(scope="module")
def segmenter(tiny_checkpoint):
    return Segmenter(tiny_checkpoint, inference_config([f"threshold={THRESHOLD}"]), device="cpu")


def items_of(segmenter: Segmenter, image: np.ndarray, prompt: str = "liver"):
    prep = Preprocessor(segmenter.plans, segmenter.size)  # shipped at the model's size, as serve does
    scan = read_scan(SAMMED2D / "images" / SLICES[0])
    case = type(scan.case)(**{**scan.case.__dict__, "image": image})
    return prep.items(case, [prompt], [None], [0], prep.intensity(case))


def images() -> list[np.ndarray]:
    """Two real colour CT slices and a blank grayscale image (its square has one band, theirs three)."""
    real = [read_scan(SAMMED2D / "images" / name).case.image for name in SLICES[:2]]
    return [*real, np.zeros(real[0].shape[:2], np.uint8)]


def same(a, b) -> bool:
    return abs(a.score - b.score) <= SCORE_TOL and np.mean(a.mask != b.mask) <= PIXEL_TOL


def test_mixed_images_each_get_their_own_answer(segmenter):
    pictures = images()
    alone = [segmenter.run_items(items_of(segmenter, image))[0] for image in pictures]
    # the images' own answers differ, so a borrowed answer would show
    assert not np.array_equal(alone[0].mask, alone[1].mask) and alone[0].mask.any() and alone[1].mask.any()
    order = [0, 1, 2, 1, 0, 2, 2, 0, 1]
    mixed = segmenter.run_items([items_of(segmenter, pictures[i])[0] for i in order])
    for i, answer in zip(order, mixed, strict=True):
        assert same(answer, alone[i]), f"item of image {i} got another image's answer"


def test_an_answer_does_not_depend_on_its_batch(segmenter):
    """The same item alone, and inside a full batch (16) of other, different items."""
    rng = random.Random(0)
    base = [read_scan(SAMMED2D / "images" / name).case.image for name in SLICES]
    target = items_of(segmenter, base[0], "spleen")[0]
    alone = segmenter.run_items([target])[0]
    others = []
    for n in range(15):  # different pixels (one changed pixel is a different image) and prompts
        image = base[n % len(base)].copy()
        image[n, n] = 255 - image[n, n]
        others += items_of(segmenter, image, rng.choice(["liver", "spleen", "left kidney"]))
    batch = others[:7] + [target] + others[7:]
    batched = segmenter.run_items(batch)
    assert len({item.square_key for item in batch}) == 16
    assert same(batched[7], alone)
    # and the shared squares of one image still share: two prompts on one slice, one vision pass
    two = items_of(segmenter, base[0], "liver")[0], target
    assert two[0].square_key == two[1].square_key
