"""Volumes as volumes: SAM3's video model (transformers' Sam3VideoModel) for 3D propagation, and
clip training of its detector and tracker under Ray Train + DeepSpeed ZeRO-3 on real CT."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from medsam3.config import load_config
from medsam3.inference import Segmenter, box_from_text, inference_config, prompt_request
from medsam3.io.scan import read_scan
from medsam3.losses import TargetRule
from medsam3.metrics import dice
from medsam3.model import CheckpointError, build_model, build_word_tokenizer, tokenize
from medsam3.propagate import LazyFrames, PropagationSettings
from medsam3.transforms import display_slice
from medsam3.video import assemble_video_model, build_video_model, checkpoint_type, preset_video_config
from pipelines.clip_data import clip_windows, count_clips
from tests.builders import loss_weights
from tests.conftest import (
    CLIP_STEPS,
    CLIPS,
    LESION_CASE,
    lesion_slices_dice,
    lesion_truth,
    seed_on_middle_slice,
)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- fast: the pieces ------------------------------------------------------------------------

def test_a_box_names_its_seed_slice():
    assert box_from_text("10,20,30,40") == ([10, 20, 30, 40], None)
    assert box_from_text(" 10,20,30,40@z=57") == ([10, 20, 30, 40], 57)
    for bad in ("10,20,30,40@57", "10,20,30,40@z=-1", "10,20,30,40@y=3", "10,20,5,40@z=1"):
        with pytest.raises(ValueError, match="box"):
            box_from_text(bad)
    request = prompt_request(["liver", "lesion", "spleen"], ["1,2,3,4@z=3", "1,2,3,4"])
    assert request.boxes == [[1, 2, 3, 4], [1, 2, 3, 4], None] and request.slices == [3, None, None]


def test_clips_cover_every_slice_and_end_at_the_last():
    settings = PropagationSettings(clip_length=8, clip_overlap=4)
    for depth in (1, 5, 8, 13, 600):
        clips = settings.clips(depth)
        covered = sorted({k for clip in clips for k in clip})
        assert covered == list(range(depth)) and clips[-1].stop == depth
        assert all(len(c) == min(8, depth) for c in clips)
    assert [c.start for c in settings.clips(13)] == [0, 4, 5]
    with pytest.raises(ValueError, match="clip_overlap"):
        PropagationSettings.from_config({"clip_length": 4, "clip_overlap": 4})


def test_training_clips_are_runs_of_consecutive_stored_slices():
    # slices 3..9 and 20..21 stored (prepare sampled the others out), in shuffled row order
    indices = np.array([7, 3, 21, 4, 9, 5, 20, 6, 8])
    windows = [sorted(indices[w].tolist()) for w in clip_windows(indices, 4)]
    assert windows == [[3, 4, 5, 6], [6, 7, 8, 9], [20, 21]]
    assert [w.tolist() for w in clip_windows(np.array([-1, -1]), 4)] == [[0], [1]]  # 2D images: one each
    assert count_clips({("d", "a", "liver"): indices.tolist(), ("d", "b", "liver"): [-1]}, 4) == 4


def test_a_short_run_or_a_2d_image_is_a_padded_clip_whose_padding_the_loss_ignores():
    from pipelines.clip_data import augment_clips, make_clips
    from pipelines.train_data import Augmentation

    side = 8
    images = [np.full((side, side, 3), k, np.uint8).tobytes() for k in range(3)]
    masks = [np.pad(np.ones((2, 2), np.uint8), ((k, side - 2 - k), (0, side - 2))).tobytes() for k in range(3)]
    group = {"image": np.array(images, dtype=object), "mask": np.array(masks, dtype=object),
             "slice_index": np.array([5, 4, 6]), "dataset": np.array(["d"] * 3, dtype=object),
             "case_id": np.array(["c"] * 3, dtype=object), "prompt": np.array(["liver"] * 3, dtype=object)}
    clips = make_clips(group, 4)
    assert list(clips["frames"]) == [3] and list(clips["slice_index"]) == [4]
    rows, _, _, valid = augment_clips(clips, side, Augmentation(), 0, 0, 4)
    assert valid.tolist() == [[True, True, True, False]]
    # frames in slice order (4, 5, 6), the padding a copy of the last
    assert [int(p[0, 0, 0] * 127.5 + 127.5 + 0.5) for p in rows["pixel_values"]] == [1, 0, 2, 2]
    assert list(rows["slice_index"]) == [4, 5, 6, 6]
    flat = {**{k: v[:1] for k, v in group.items()}, "slice_index": np.array([-1])}
    single = make_clips(flat, 4)
    assert list(single["frames"]) == [1] and len(single["image"][0]) == 4 * side * side * 3


@pytest.mark.slow
def test_clips_cut_in_the_driver_equal_ray_datas_groupby(ray_local, lesion_shards):
    import ray

    from medsam3.schema import arrow_source, shard_files
    from pipelines.clip_data import clip_dataset

    paths, filesystem = arrow_source(shard_files(lesion_shards / "shards"))
    rows = ray.data.read_parquet(paths, filesystem=filesystem)

    def clips(in_driver: bool) -> list[tuple]:
        return [(r["dataset"], r["case_id"], r["prompt"], int(r["slice_index"]), int(r["frames"]), bytes(r["image"]),
                 bytes(r["mask"])) for r in clip_dataset(rows, 4, in_driver=in_driver).take_all()]

    driver = clips(True)
    assert [clip[3] for clip in driver] == [3, 6]  # the lesion's two clips, in slice order
    assert driver == sorted(clips(False))


def test_clip_mode_needs_a_preset_with_a_tracker():
    from pipelines.settings import TrainError, TrainSettings

    with pytest.raises(TrainError, match="has no tracker"):
        TrainSettings.from_config(load_config("train", ["train.mode=clips", "model.preset=tiny"]))
    assert TrainSettings.from_config(load_config("train", CLIPS)).frames_per_batch == 4
    with pytest.raises(TrainError, match="train.mode"):
        TrainSettings.from_config(load_config("train", ["train.mode=video"]))


def test_lazy_frames_make_frames_on_demand_and_keep_few():
    made = []
    frames = LazyFrames(lambda i: made.append(i) or torch.full((1,), float(i)), count=100, keep=2)
    assert len(frames) == 100 and float(frames[5][0]) == 5.0 and float(frames[5][0]) == 5.0
    for i in range(10):
        frames[i]
    assert made == [5, *range(10)] and len(frames.recent) == 2
    with pytest.raises(KeyError):
        frames[100]


def _random_video(keep_detections: bool):
    """The tiny video preset with a random tracker; ``keep_detections``: every detector query kept
    (thresholds 0), so text-started clips run the tracker on the objects the detector adds."""
    torch.manual_seed(0)
    video = assemble_video_model(build_model("tiny_video"), None, "tiny_video", allow_random_tracker=True).eval()
    if keep_detections:
        video.score_threshold_detection = video.new_det_thresh = 0.0
    return video, build_word_tokenizer(["lesion", "liver"])


def _volume(depth: int, size: int):
    """Random model pixels with a bright block moving through the slices (something to find)."""
    rng = torch.Generator().manual_seed(1)
    volume = torch.randn(depth, 3, size, size, generator=rng) * 0.3
    for k in range(depth):
        volume[k, :, 60 + 3 * k:130 + 3 * k, 70:150] += 2.0
    return lambda k: volume[k]


def _per_session_passes(monkeypatch):
    """Text sessions without the shared vision pass and detections: transformers runs the backbone
    and the detector on every frame of every session itself."""
    from medsam3.propagate import VolumePropagator

    monkeypatch.setattr(VolumePropagator, "_shared_detector", lambda *_: contextlib.nullcontext())


def _assert_same_text_answers(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, (prob, score) in want.items():
        torch.testing.assert_close(got[key][0], prob, atol=2e-4, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
        assert got[key][1] == pytest.approx(score, abs=2e-4), key


def test_text_propagation_runs_each_slice_through_the_backbone_once(monkeypatch):
    """Two prompts, 13 slices in clips of 8 overlapping by 4, both directions: each slice goes
    through the backbone once (batches of 4), and the answers are those of sessions that each run
    the backbone and the detector on every frame themselves (one prompt at a time)."""
    from medsam3.propagate import VolumePropagator

    video, tokenizer = _random_video(keep_detections=True)
    pixels, prompts = _volume(13, 224), ["lesion", "liver"]
    shared = VolumePropagator(video, tokenizer, PropagationSettings(), batch_size=4)
    got = {(p, k): (prob, score) for p, k, prob, score in shared.text(pixels, 13, prompts)}
    assert shared.vision.computed == 13 and not shared.vision.held
    assert sum(float(prob.max()) > 0.5 for prob, _ in got.values()) > 5  # the tracker's masks, not zeros
    _per_session_passes(monkeypatch)
    want = {}
    for p, prompt in enumerate(prompts):
        alone = VolumePropagator(video, tokenizer, PropagationSettings(), batch_size=1)
        want |= {(p, k): (prob, score) for _, k, prob, score in alone.text(pixels, 13, [prompt])}
    _assert_same_text_answers(got, want)


def test_seeds_on_different_slices_share_the_vision_pass_and_answer_as_alone():
    """Objects seeded on slices 3 and 8 (a box; a box and a click): the sessions advance together,
    each slice goes through the backbone once per sweep (slices 3-7 twice), and every object's
    answers are those of its slice's session run alone."""
    from medsam3.propagate import VolumePropagator

    video, tokenizer = _random_video(keep_detections=False)
    pixels = _volume(13, 224)
    groups = [(3, [([60.0, 70.0, 140.0, 150.0], None)]),
              (8, [([80.0, 60.0, 160.0, 150.0], None), (None, [[110.0, 100.0, 1]])])]
    together = VolumePropagator(video, tokenizer, PropagationSettings(), batch_size=4)
    got = {(g, k): answers for g, k, answers in together.seeded(pixels, 13, groups)}
    assert together.vision.computed == 13 + (8 - 3) and len(got) == 2 * 13
    for g, group in enumerate(groups):
        alone = VolumePropagator(video, tokenizer, PropagationSettings(), batch_size=1)
        for _, k, answers in alone.seeded(pixels, 13, [group]):
            for (prob, score), (want, want_score) in zip(got[(g, k)], answers, strict=True):
                torch.testing.assert_close(prob, want, atol=2e-4, rtol=0)
                assert score == pytest.approx(want_score, abs=2e-4)
        assert alone.vision.computed == 13
    assert any(float(prob.max()) > 0.5 for answers in got.values() for prob, _ in answers)


def test_a_video_model_needs_trained_tracker_weights(tmp_path):
    detector = build_model("tiny_video")
    with pytest.raises(CheckpointError, match="no tracker weights"):
        assemble_video_model(detector, None, "tiny_video")
    # a tracker comes from a SAM3 video folder, every tensor of it
    torch.manual_seed(3)
    source = build_video_model("tiny_video")
    source.save_pretrained(tmp_path / "video")
    video = assemble_video_model(detector, tmp_path / "video", "tiny_video")
    theirs, ours = source.state_dict(), video.state_dict()
    tracker = [k for k in ours if k.startswith(("tracker_model.", "tracker_neck."))]
    assert len(tracker) > 100 and all(torch.equal(ours[k], theirs[k]) for k in tracker)
    assert all(torch.equal(ours[k], v) for k, v in
               {f"detector_model.{k}": v for k, v in detector.state_dict().items()}.items())
    # a tracker of another size does not fit this detector: refused with the names
    with pytest.raises(CheckpointError, match="does not fit"):
        assemble_video_model(build_model("tiny"), tmp_path / "video", "tiny")
    # an image folder is not a tracker source
    detector.save_pretrained(tmp_path / "image")
    with pytest.raises(CheckpointError, match="not a SAM3 video checkpoint"):
        assemble_video_model(detector, tmp_path / "image", "tiny_video")
    assert checkpoint_type(tmp_path / "video") == "sam3_video" and checkpoint_type(tmp_path / "image") == "sam3"


def test_an_image_checkpoint_cannot_propagate_and_seeds_need_a_slice(tiny_checkpoint, tmp_path):
    case = read_scan(sorted(Path(__file__).parents[2].joinpath("shared/data/medsam2-recist-ct").glob("*.npz"))[0]).case
    with pytest.raises(CheckpointError, match="cannot propagate"):
        Segmenter(tiny_checkpoint, inference_config()).segment(case, ["lesion"], mode="propagate")
    torch.manual_seed(0)
    video = assemble_video_model(build_model("tiny_video"), None, "tiny_video", allow_random_tracker=True)
    video.save_pretrained(tmp_path / "video")
    build_word_tokenizer(["lesion"]).save_pretrained(tmp_path / "video")
    segmenter = Segmenter(tmp_path / "video", inference_config())
    with pytest.raises(ValueError, match="@z=N"):
        segmenter.segment(case, ["lesion"], ["100,100,200,200"], mode="propagate")
    with pytest.raises(ValueError, match="outside the volume"):
        segmenter.segment(case, ["lesion"], ["100,100,200,200@z=99"], mode="propagate")
    # clicks seed the tracker only (Sam3Model takes no points), need a foreground click, one slice
    with pytest.raises(ValueError, match="mode propagate"):
        segmenter.segment(case, ["lesion"], clicks=[([[150, 150, 1]], 3)])
    with pytest.raises(ValueError, match="foreground"):
        segmenter.segment(case, ["lesion"], clicks=[([[150, 150, 0]], 3)], mode="propagate")
    with pytest.raises(ValueError, match="one slice"):
        segmenter.segment(case, ["lesion"], ["100,100,200,200@z=2"], mode="propagate", clicks=[([[150, 150, 1]], 3)])
    # the clicks reach the tracker's prompt encoder: moving one changes the seed slice's mask
    seeded = [segmenter.segment(case, ["lesion"], mode="propagate", clicks=[([[x, 150, 1], [40, 40, 0]], 3)])[0]
              for x in (60, 200)]
    axis = segmenter.prep.axis
    assert seeded[0].mask.shape == case.image.shape
    assert not np.array_equal(display_slice(seeded[0].mask, axis, 3), display_slice(seeded[1].mask, axis, 3))


def test_the_tracker_trains_through_its_memory():
    """One teacher-forced step: gradients reach the memory attention and the memory encoder (the
    parts that carry a mask from slice to slice), not only the SAM decoder."""
    from medsam3.clip_model import Sam3VideoForClipTraining, tracker_loss

    torch.manual_seed(0)
    model = Sam3VideoForClipTraining(preset_video_config("tiny_video")).train()
    tokens = tokenize(build_word_tokenizer(["lesion"]), ["lesion"] * 4)
    masks = torch.zeros(1, 4, 224, 224)
    masks[0, 1:, 50:90, 60:100] = 1
    out = model(torch.randn(4, 3, 224, 224), tokens["input_ids"], tokens["attention_mask"],
                seed_frames=torch.tensor([1]), seed_boxes=torch.tensor([[60.0, 50, 100, 90]]))
    assert out.masks.shape == (1, 4, 224, 224) and out.object_logits.shape == (1, 4)
    weights = loss_weights("released")
    sum(tracker_loss(out, masks, torch.ones(1, 4, dtype=torch.bool), weights).values()).backward()
    for part in ("memory_attention", "memory_encoder", "mask_decoder", "object_pointer_proj"):
        grads = [p.grad for n, p in model.tracker_model.named_parameters() if n.startswith(part)]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), part
    neck = [p.grad for p in model.tracker_neck.parameters() if p.grad is not None]
    backbone = [p.grad for p in model.detector_model.vision_encoder.backbone.parameters() if p.grad is not None]
    assert neck and backbone  # the shared backbone learns from the tracker too


def test_training_takes_the_mask_inference_takes(monkeypatch):
    """The seed slice's mask in a training forward is the one the eval-mode forward (inference)
    returns, also where the decoder's single mask is unstable and inference falls back to a
    multimask output (a random tracker here): that fallback mask is what training must teach."""
    from medsam3 import clip_model

    torch.manual_seed(0)
    model = clip_model.Sam3VideoForClipTraining(preset_video_config("tiny_video"))
    head = [m for m in model.tracker_model.mask_decoder.pred_obj_score_head.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        head[-1].bias.fill_(10.0)  # the random tracker sees the object, so its masks are kept
    tokens = tokenize(build_word_tokenizer(["lesion"]), ["lesion"] * 4)
    pixels = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    seed = {"seed_frames": torch.tensor([1]), "seed_boxes": torch.tensor([[60.0, 50, 100, 90]])}

    def seed_mask(train: bool) -> torch.Tensor:
        model.train(train)
        with torch.no_grad():
            return model(pixels, tokens["input_ids"], tokens["attention_mask"], **seed).masks[0, 1]

    inference = seed_mask(False)
    assert inference.max() > -1024 and torch.equal(seed_mask(True), inference)
    monkeypatch.setattr(clip_model, "inference_mask_choice", lambda decoder: contextlib.nullcontext())
    assert not torch.equal(seed_mask(True), inference)  # the single mask is unstable here: the case that matters


def test_one_seed_kind_per_step_the_same_on_every_rank():
    from pipelines.clip_data import SEED_KINDS, step_seed_kind
    from pipelines.settings import TrainError, TrainSettings

    weights = dict(load_config("train").train.clip_seed)
    drawn = [step_seed_kind(weights, 0, step) for step in range(1, 2001)]
    assert drawn == [step_seed_kind(weights, 0, step) for step in range(1, 2001)]  # a function of (seed, step)
    for kind in SEED_KINDS:  # the configured mix
        assert abs(drawn.count(kind) / len(drawn) - weights[kind]) < 0.04, kind
    assert set(step_seed_kind({"box": 1.0, "clicks": 0.0}, 3, s) for s in range(50)) == {"box"}
    with pytest.raises(TrainError, match="clip_seed"):
        TrainSettings.from_config(load_config("train", [*CLIPS, "train.clip_seed.box=0"]))


def test_each_seed_kind_prompts_the_seed_frame_and_trains_the_tracker():
    """Clips of 4 frames seeded on frame 1 (frame 3 padding): a mask seed (the detector's top mask,
    or the ground truth) is the seed frame's output as it is; a click or a box goes through the
    prompt encoder; every kind trains the memory attention through the frames after the seed."""
    from medsam3.clip_model import Sam3VideoForClipTraining, tracker_loss
    from pipelines.clip_data import SEED_KINDS, collate_clips

    torch.manual_seed(0)
    model = Sam3VideoForClipTraining(preset_video_config("tiny_video")).train()
    tokenizer = build_word_tokenizer(["lesion"])
    masks = np.zeros((4, 224, 224), np.uint8)
    masks[:3, 50:90, 60:100] = 1
    rows = {"pixel_values": np.random.default_rng(1).normal(size=(4, 3, 224, 224)).astype(np.float32),
            "mask": masks, "prompt": np.array(["lesion"] * 4, dtype=object)}
    valid = np.array([[True, True, True, False]])
    seed_frames = []
    for kind in SEED_KINDS:
        rngs = [np.random.default_rng(k) for k in range(4)]
        inputs, _, truth, valid_t = collate_clips(rows, tokenizer, rngs, [np.random.default_rng(5)], valid, 0.0,
                                                  0.1, 20, TargetRule(), kind)
        seed = int(inputs["seed_frames"][0])
        seed_frames.append(seed)
        assert 0 <= seed <= 2 and int(inputs["seed_kinds"][0]) == SEED_KINDS.index(kind)
        model.zero_grad()
        out = model(**inputs)
        got = out.masks[0, seed] > 0
        if kind == "detector":
            detector = out.detector
            score = detector.pred_logits[seed].sigmoid() * detector.presence_logits[seed].sigmoid()
            top = torch.nn.functional.interpolate(detector.pred_masks[seed, score.argmax()][None, None],
                                                  size=(224, 224), mode="bilinear") > 0
            assert torch.equal(got, top[0, 0])
        elif kind == "mask":
            assert torch.equal(got, truth[0, seed]) and out.object_logits[0, seed] == 10
        elif kind == "clicks":
            x, y = inputs["seed_points"][0].tolist()
            assert masks[seed, int(y), int(x)] == 1  # the click is inside the structure
        sum(tracker_loss(out, truth, valid_t, loss_weights("released")).values()).backward()
        grads = [p.grad for n, p in model.tracker_model.named_parameters() if n.startswith("memory_attention")]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), kind


def test_a_correction_click_is_drawn_from_the_error_and_labelled_by_it():
    from medsam3.clip_model import error_click

    truth = torch.zeros(8, 8, dtype=torch.bool)
    truth[2:6, 2:6] = True
    missed = truth.clone()
    missed[2:6, 2:4] = False  # the left half of the structure missed
    spilled = truth.clone()
    spilled[6:8, :] = True  # two rows of background taken
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        (x, y), label = error_click(truth, missed, g)
        assert label == 1 and truth[int(y), int(x)] and not missed[int(y), int(x)]
        (x, y), label = error_click(truth, spilled, g)
        assert label == 0 and int(y) >= 6
        (x, y), label = error_click(truth, truth.clone(), g)  # nothing wrong: a negative click outside
        assert label == 0 and not truth[int(y), int(x)]
        (x, y), label = error_click(truth, None, g)  # from the ground truth alone: inside it
        assert label == 1 and truth[int(y), int(x)]
    draw = [error_click(truth, missed, torch.Generator().manual_seed(3))[0].tolist() for _ in range(2)]
    assert draw[0] == draw[1]


@pytest.mark.parametrize("shown", [True, False])
def test_correction_clicks_refine_the_seed_frame_and_train_every_step(shown):
    """A box-seeded clip with 3 correction clicks: the seed frame is predicted 4 times, each time
    with one more click and the previous mask, and the loss counts every step. A clip that never
    shows the structure runs the same steps with negative clicks (ZeRO-3: the same modules on every
    rank)."""
    from medsam3.clip_model import Sam3VideoForClipTraining, tracker_loss
    from pipelines.clip_data import collate_clips

    torch.manual_seed(0)
    model = Sam3VideoForClipTraining(preset_video_config("tiny_video")).train()
    tokenizer = build_word_tokenizer(["lesion"])
    masks = np.zeros((3, 224, 224), np.uint8)
    if shown:
        masks[:, 50:90, 60:100] = 1
    rows = {"pixel_values": np.random.default_rng(1).normal(size=(3, 3, 224, 224)).astype(np.float32),
            "mask": masks, "prompt": np.array(["lesion"] * 3, dtype=object)}
    valid = np.ones((1, 3), bool)
    corrections = {"clicks": 3, "from_ground_truth": 0.0}
    inputs, _, truth, valid_t = collate_clips(rows, tokenizer, [np.random.default_rng(k) for k in range(3)],
                                              [np.random.default_rng(5)], valid, 0.0, 0.1, 20, TargetRule(),
                                              "box", corrections)
    seen = []
    original = model.tracker_model._single_frame_forward

    def recorded(*args, **kwargs):
        seen.append((kwargs.get("input_labels"), kwargs.get("input_masks")))
        return original(*args, **kwargs)

    model.tracker_model._single_frame_forward = recorded
    out = model(**inputs)
    seed = int(inputs["seed_frames"][0]) if shown else 0
    assert out.step_masks.shape == (1, 3, 224, 224) and int(out.step_frames[0]) == seed
    labels = [s[0] for s in seen if s[1] is not None]  # the three corrected predictions
    assert len(seen) == 3 + 3 and len(labels) == 3
    assert [lab.shape[-1] for lab in labels] == ([3, 4, 5] if shown else [1, 2, 3])  # box corners + clicks
    if not shown:  # nothing to find: every click says "not here"
        assert all(int(v) == 0 for v in labels[-1].flatten())
    assert not torch.equal(out.step_masks[0, 0], out.masks[0, seed])  # the clicks changed the mask
    terms = tracker_loss(out, truth, valid_t, loss_weights("released"))
    without = tracker_loss(type(out)(detector=out.detector, masks=out.masks, iou=out.iou,
                                     object_logits=out.object_logits), truth, valid_t, loss_weights("released"))
    assert terms["tracker_object"] != without["tracker_object"]
    model.zero_grad()
    sum(terms.values()).backward()
    assert model.tracker_model.prompt_encoder.mask_embed.conv1.weight.grad.abs().sum() > 0  # the fed-back mask


# --- slow: clip training on real CT, then propagation ----------------------------------------

@pytest.mark.slow
def test_the_clip_run_steps_with_a_mask_seed_and_a_box_seed_on_both_ranks(clip_trained):
    """The fixture's first two steps, under 2 ZeRO-3 workers, drew a mask seed and a box seed from
    the default mix (each runs other prompt-encoder modules, reduced across ranks): both trained
    with finite losses; from step 3 on the run seeds with boxes."""
    from pipelines.clip_data import step_seed_kind

    run_dir = clip_trained[0]
    weights = dict(load_config("train").train.clip_seed)
    assert [step_seed_kind(weights, 0, k) for k in (1, 2)] == ["mask", "box"]
    final = {m["step"]: m for m in metrics(run_dir)}
    assert [final[k]["seed_kind"] for k in (1, 2)] == ["mask", "box"]
    assert {m["seed_kind"] for k, m in final.items() if k > 2} == {"box"}
    assert all(np.isfinite(final[k]["loss"]) and np.isfinite(final[k]["tracker_mask_dice"]) for k in (1, 2))


@pytest.mark.slow
def test_a_clip_run_overfits_its_clips(clip_trained):
    run_dir, model, _, _ = clip_trained
    final = {m["step"]: m for m in metrics(run_dir)}  # each step's final attempt (a worker was killed)
    steps = len(final)
    assert sorted(final) == list(range(1, steps + 1)) and steps in CLIP_STEPS
    log = [final[s] for s in sorted(final)]
    first, last = log[0]["loss"], np.mean([m["loss"] for m in log[-5:]])
    assert last < first / 2, (first, last)
    early, late = (np.mean([m["tracker_dice"] for m in part]) for part in (log[:5], log[-5:]))
    assert early < 0.2 and late > 0.8, (early, late)
    assert {"tracker_object", "tracker_mask_focal", "tracker_mask_dice", "tracker_iou", "class"} <= set(log[-1])
    # both clips of 4 slices, one per worker each step
    assert all(sorted(m["samples"]) == ["CT_Lesion_000009_03_01_036-048#3", "CT_Lesion_000009_03_01_036-048#6"]
               for m in log)
    assert checkpoint_type(model) == "sam3_video"


@pytest.mark.slow
def test_a_box_seeded_on_the_middle_slice_is_tracked_through_the_lesion(clip_trained, tmp_path):
    _, model, scans, _ = clip_trained
    segmenter = Segmenter(model, inference_config())
    case = read_scan(scans / LESION_CASE).case
    gt = lesion_truth(scans, segmenter)
    axis = segmenter.prep.axis
    z, box = seed_on_middle_slice(gt, axis)

    def near(mask):  # Dice on the two slices either side of the seed
        return [dice(display_slice(mask, axis, k), display_slice(gt, axis, k)) for k in (z - 2, z - 1, z + 1, z + 2)]

    tracked = segmenter.segment(case, ["lesion"], [f"{box}@z={z}"], mode="propagate")[0]
    assert min(near(tracked.mask)) > 0.7, near(tracked.mask)
    assert lesion_slices_dice(tracked.mask, gt, axis) > 0.7 and tracked.slice_scores[z] > 0.5
    assert dice(tracked.mask, gt) > 0.5  # the whole volume: slices it never trained on included
    # the same detector with an untrained tracker follows nothing: the trained tracker does the work
    untrained = tmp_path / "untrained"
    assemble_video_model(segmenter.model, None, "tiny_video", allow_random_tracker=True).save_pretrained(untrained)
    for name in os.listdir(model):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "plans", "medsam3_export")):
            (untrained / name).write_bytes((model / name).read_bytes())
    control = Segmenter(untrained, inference_config()).segment(case, ["lesion"], [f"{box}@z={z}"], mode="propagate")[0]
    assert max(near(control.mask)) < 0.3, near(control.mask)
    # slice by slice with the same single-slice box: the detector alone on the other slices
    # (reported beside propagation in the README; here both must find the lesion)
    sliced = segmenter.segment(case, ["lesion"], [f"{box}@z={z}"], mode="slices")[0]
    assert dice(sliced.mask, gt) > 0.5


@pytest.mark.slow
def test_text_propagation_on_the_trained_lesion_answers_as_per_session_passes(clip_trained, monkeypatch):
    """The clip-trained model on its lesion volume, where the detector finds the lesion: the shared
    vision pass and detections give the answers of sessions that compute every frame themselves."""
    from medsam3.propagate import VolumePropagator, square_pixels

    _, model, scans, _ = clip_trained
    segmenter = Segmenter(model, inference_config())
    case = read_scan(scans / LESION_CASE).case
    prep, intensity = segmenter.prep, segmenter.prep.intensity(case)
    window = segmenter.window("lesion", case.modality)
    settings = PropagationSettings.from_config(segmenter.cfg.propagate)

    def answers(batch_size: int) -> dict:
        propagator = VolumePropagator(segmenter.video, segmenter.tokenizer, settings, batch_size=batch_size)
        pixels = square_pixels(lambda k: prep.plans.square(prep.plane(case, k), intensity, window, None),
                               propagator.size)
        return {k: (prob, score) for _, k, prob, score in propagator.text(pixels, prep.num_slices(case), ["lesion"])}

    got = answers(8)
    assert sum(score > 0.5 for _, score in got.values()) >= 3  # the detector finds the lesion
    _per_session_passes(monkeypatch)
    _assert_same_text_answers(got, answers(1))


@pytest.mark.slow
def test_predict_and_evaluate_propagate(clip_trained, tmp_path):
    import nibabel as nib

    from pipelines.evaluate import run_evaluate
    from pipelines.predict import run_predict

    _, model, scans, shards = clip_trained
    segmenter = Segmenter(model, inference_config())
    gt = lesion_truth(scans, segmenter)
    z, box = seed_on_middle_slice(gt, segmenter.prep.axis)
    cfg = inference_config(["mode=propagate"])
    summary = run_predict(scans / LESION_CASE, ["lesion"], model, tmp_path / "p", cfg, boxes=[f"{box}@z={z}"],
                          progress=False)
    labels = np.asanyarray(nib.load(tmp_path / "p" / "labels.nii.gz").dataobj)
    assert labels.shape == gt.shape and lesion_slices_dice(labels == 1, gt, segmenter.prep.axis) > 0.7
    assert dice(labels == 1, gt) > 0.5
    assert summary["prompts"][0]["voxels"] == int((labels == 1).sum()) and summary["prompts"][0]["volume_ml"] > 0
    # evaluate: the slice modes and the propagation modes side by side, on the whole volume
    out = tmp_path / "eval"
    cfg = inference_config(["modes=[text,text+box,propagate,propagate+box]", f"scans={scans}", "split=all"],
                           stage="evaluate")
    run_evaluate(shards, [str(model)], out, cfg)
    import pandas as pd

    table = pd.read_csv(out / "metrics.csv").set_index("mode")
    assert set(table.index) == {"text", "text+box", "propagate", "propagate+box"}
    assert (table["slices"] == gt.shape[segmenter.prep.axis]).all()  # whole volumes, every slice
    assert table.loc["propagate+box", "dice"] > 0.5  # whole volumes (see lesion_slices_dice)
    report = (out / "report.md").read_text()
    assert f"| {model.name} | propagate+box |" in report and f"| {model.name} | text |" in report


@pytest.mark.slow
def test_clip_mode_resumes_and_survives_a_killed_worker(clip_trained):
    """The clip fixture's run, stopped at step 2, resumed by name, and a worker SIGKILLed after
    the resumed run's first step: it went on from checkpoint 2, never from the start, and the
    step it redid gave the same loss on the same clips."""
    run_dir = clip_trained[0]
    steps = [m["step"] for m in metrics(run_dir)]
    assert steps[:3] == [1, 2, 3] and steps[-1] in CLIP_STEPS  # resumed at step 3, not a fresh run
    assert steps.count(1) == steps.count(2) == 1 and steps.count(3) == 2  # step 3 redone from checkpoint 2
    assert max(steps.count(s) for s in steps) == 2 and sorted(set(steps)) == list(range(1, steps[-1] + 1))
    first, redone = (m for m in metrics(run_dir) if m["step"] == 3)
    assert redone["loss"] == first["loss"] and redone["samples"] == first["samples"]  # the same step again
    assert "tracker_dice" in metrics(run_dir)[-1]
