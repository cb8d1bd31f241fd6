"""The training configuration read once into typed fields, with its bad combinations refused.

``configs/train.yaml`` (merged with overrides) becomes a frozen :class:`TrainSettings` on the
driver, before any worker starts; workers rebuild it from the same mapping. Loss weights and
learning rates stay mappings: ``set_loss`` and ``param_groups`` read them by name. ``auto``
settings are resolved here (the loss objective and targets, the precision, the ZeRO stage) and
written back into the run's ``train_config.yaml`` by the driver, so the run records what it did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from medsam3.errors import StageError
from medsam3.io import storage
from medsam3.losses import OBJECTIVES, TargetRule
from medsam3.model import preset
from medsam3.plans import EXPORT_FILE
from pipelines.train_data import Augmentation

PRECISIONS = ("auto", "fp32", "bf16")
MODES = ("images", "clips")
METHODS = ("full", "lora")
ZERO_STAGES = (0, 1, 2, 3)


class TrainError(StageError):
    """The run cannot start (bad settings or shards, not enough resources) or was stopped (NaN loss)."""


def trained_objective(model_path: str) -> str:
    """``loss.objective=auto`` for trained weights: the objective they were trained with. An export
    of this project records it in ``medsam3_export.json`` (one without the record was trained with
    ``detr``); weights without an export record (SAM3's or Medical SAM3's released weights, a
    ``medsam3 import``) were trained with the released objective."""
    record = storage.join(model_path, EXPORT_FILE)
    if not storage.is_file(record):
        return "released"
    return (json.loads(storage.read_text(record)).get("loss") or {}).get("objective") or "detr"


@dataclass(frozen=True)
class TrainSettings:
    mode: str  # images | clips
    method: str  # full | lora
    zero_stage: int  # resolved: 0 (plain data parallel) .. 3
    lora: dict[str, Any]
    clip_length: int
    clip_seed: dict[str, float]  # weight per tracker seed kind (pipelines/clip_data.py)
    clip_corrections: dict[str, float]  # SAM2's correction clicks: {clicks, from_ground_truth}
    preset: str | None
    model_path: str | None
    bpe_path: str | None
    num_workers: int
    use_gpu: bool
    precision: str  # resolved: fp32 | bf16
    cpus_per_worker: float
    activation_checkpointing: bool
    zero_optimization: dict[str, Any]
    batch_size: int
    max_steps: int
    checkpoint_every: int
    num_to_keep: int
    max_failures: int
    val_every: int
    val_fraction: float
    val_batches: int
    threshold: float
    seed: int
    shuffle_buffer: int
    cache_max_mb: float
    box_prompt_prob: float
    box_noise: float
    box_noise_max_px: float
    targets: TargetRule  # resolved loss.targets and loss.max_instances
    gradient_clipping: float
    augment: Augmentation
    run_name: str | None
    loss: dict[str, Any]  # the resolved objective's weights, with "objective" (released | detr)
    optim: DictConfig

    @classmethod
    def from_config(cls, cfg: DictConfig) -> TrainSettings:
        t = cfg.train
        value = str(t.precision)
        if value not in PRECISIONS:
            raise TrainError(f"train.precision={value!r}: expected one of {', '.join(PRECISIONS)}")
        resolved = ("bf16" if t.use_gpu else "fp32") if value == "auto" else value
        try:
            augment = Augmentation.from_config(t)
        except ValueError as exc:
            raise TrainError(str(exc)) from exc
        mode = str(t.mode)
        if mode not in MODES:
            raise TrainError(f"train.mode={mode!r}: expected one of {', '.join(MODES)}")
        method = str(t.get("method", "full"))
        if method not in METHODS:
            raise TrainError(f"train.method={method!r}: expected one of {', '.join(METHODS)}")
        stage = t.get("zero_stage", "auto")
        stage = (3 if method == "full" else 0) if stage in (None, "auto") else stage
        if stage not in ZERO_STAGES:
            raise TrainError(f"train.zero_stage={stage!r}: expected auto or one of 0, 1, 2, 3")
        objective = str(cfg.loss.objective)
        if objective == "auto":
            objective = trained_objective(cfg.model.path) if cfg.model.path else "detr"
        if objective not in OBJECTIVES:
            raise TrainError(f"loss.objective={objective!r}: expected auto or one of {', '.join(OBJECTIVES)}")
        kind = str(cfg.loss.targets)
        kind = ("union" if objective == "released" else "components") if kind == "auto" else kind
        try:
            targets = TargetRule(kind, int(cfg.loss.max_instances) or None)
        except ValueError as exc:
            raise TrainError(str(exc)) from exc
        settings = cls(
            mode=mode, method=method, zero_stage=int(stage),
            lora=OmegaConf.to_container(t.lora, resolve=True) if "lora" in t else {},
            clip_length=int(t.clip_length),
            clip_seed={k: float(v) for k, v in t.clip_seed.items()},
            clip_corrections={"clicks": int(t.clip_corrections.clicks),
                              "from_ground_truth": float(t.clip_corrections.from_ground_truth)},
            preset=cfg.model.preset, model_path=cfg.model.path, bpe_path=cfg.model.bpe_path,
            num_workers=int(t.num_workers), use_gpu=bool(t.use_gpu), precision=resolved,
            cpus_per_worker=float(t.cpus_per_worker), activation_checkpointing=bool(t.activation_checkpointing),
            zero_optimization=OmegaConf.to_container(t.zero_optimization, resolve=True),
            batch_size=int(t.batch_size), max_steps=int(t.max_steps), checkpoint_every=int(t.checkpoint_every),
            num_to_keep=int(t.num_to_keep), max_failures=int(t.max_failures),
            val_every=int(t.val_every), val_fraction=float(t.val_fraction), val_batches=int(t.val_batches),
            threshold=float(t.threshold), seed=int(t.seed), shuffle_buffer=int(t.shuffle_buffer),
            cache_max_mb=float(t.cache_max_mb),
            box_prompt_prob=float(t.box_prompt_prob), box_noise=float(t.box_noise),
            box_noise_max_px=float(t.box_noise_max_px), targets=targets,
            gradient_clipping=float(cfg.optim.gradient_clipping), augment=augment,
            run_name=t.run_name,
            loss={"objective": objective, **OmegaConf.to_container(cfg.loss[objective], resolve=True)},
            optim=cfg.optim,
        )
        settings._check()
        return settings

    def _check(self) -> None:
        positive = {"train.num_workers": self.num_workers, "train.batch_size": self.batch_size,
                    "train.max_steps": self.max_steps, "train.checkpoint_every": self.checkpoint_every,
                    "train.cpus_per_worker": self.cpus_per_worker}
        for key, value in positive.items():
            if value <= 0:
                raise TrainError(f"{key}={value}: must be positive")
        if self.val_every < 0 or (self.val_every and self.val_batches <= 0):
            raise TrainError(f"train.val_every={self.val_every}, train.val_batches={self.val_batches}: "
                             "validation needs val_every >= 0 and val_batches > 0")
        if self.val_every and not 0 < self.val_fraction < 1:
            raise TrainError(f"train.val_every={self.val_every} needs 0 < train.val_fraction < 1 "
                             f"(got {self.val_fraction}): there would be no validation cases")
        if not 0 <= self.val_fraction < 1:
            raise TrainError(f"train.val_fraction={self.val_fraction}: expected 0 <= fraction < 1")
        if not 0 <= self.box_prompt_prob <= 1:
            raise TrainError(f"train.box_prompt_prob={self.box_prompt_prob}: expected a probability")
        from pipelines.clip_data import SEED_KINDS

        if set(self.clip_seed) - set(SEED_KINDS) or min(self.clip_seed.values(), default=-1) < 0 \
                or sum(self.clip_seed.values()) <= 0:
            raise TrainError(f"train.clip_seed={self.clip_seed}: weights >= 0 for {', '.join(SEED_KINDS)}, "
                             "at least one positive")
        corrections = self.clip_corrections
        if corrections["clicks"] < 0 or not 0 <= corrections["from_ground_truth"] <= 1:
            raise TrainError(f"train.clip_corrections={corrections}: clicks >= 0, from_ground_truth a probability")
        if self.mode == "clips" and self.clip_length < 1:
            raise TrainError(f"train.clip_length={self.clip_length}: must be positive")
        if self.mode == "clips" and self.model_path is None and "tracker" not in preset(self.preset):
            raise TrainError(f"train.mode=clips: model.preset={self.preset} has no tracker "
                             "(configs/model/tiny_video.yaml and sam3.yaml have one)")
        if self.method == "lora" and self.model_path is None:
            raise TrainError("train.method=lora adapts a trained model: set model.path to a checkpoint "
                             "folder (LoRA on random preset weights would train adapters on noise)")
        if "stage" in self.zero_optimization:
            raise TrainError("train.zero_optimization.stage: set the stage with train.zero_stage (the recipe reads it)")
        if self.method == "lora" and self.mode == "clips":
            raise TrainError("train.method=lora with train.mode=clips: LoRA adapts the detector on images "
                             "(train.mode=images); clip training fine-tunes detector and tracker in full")
        if self.method == "lora" and int(self.lora.get("r", 0)) <= 0:
            raise TrainError(f"train.lora.r={self.lora.get('r')}: the adapters' rank must be positive")
        if self.model_path is None and self.preset is None:
            raise TrainError("model.preset and model.path are both null: name a preset or a checkpoint folder")

    def deepspeed_config(self) -> dict[str, Any]:
        """DeepSpeed's configuration: ZeRO stage ``zero_stage`` (0: plain data parallel, gradients
        all-reduced; 1: optimizer state sharded; 2: and gradients; 3: and parameters)."""
        gather_on_save = {"stage3_gather_16bit_weights_on_model_save": True} if self.zero_stage == 3 else {}
        return {
            "train_micro_batch_size_per_gpu": self.batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": self.gradient_clipping,
            "zero_optimization": {"stage": self.zero_stage, **gather_on_save, **self.zero_optimization},
            "bf16": {"enabled": self.precision == "bf16"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    @property
    def objective(self) -> str:
        """The resolved ``loss.objective``: released | detr."""
        return self.loss["objective"]

    def schedule_warning(self) -> str | None:
        """A message when warm-up and cooldown take more than half of ``max_steps``: the rate then
        never reaches its peak, or falls again at once (the released 100 + 50 steps in a 40-step run
        peak at 8% of the rate, at step 20, warming up and cooling down at once)."""
        from medsam3.optim import lr_factor

        warmup, cooldown = int(self.optim.warmup_steps), int(self.optim.cooldown_steps)
        if warmup + cooldown <= self.max_steps / 2:
            return None
        peak = max(lr_factor(step, warmup, int(self.optim.lr_timescale), cooldown, self.max_steps)
                   for step in range(self.max_steps))
        return (f"optim.warmup_steps={warmup} and optim.cooldown_steps={cooldown} take more than half of "
                f"train.max_steps={self.max_steps}: the learning rate reaches {peak:.0%} of its peak at most. "
                f"For a run this short set e.g. optim.warmup_steps={max(1, self.max_steps // 10)} "
                f"optim.cooldown_steps={self.max_steps // 5}")

    @property
    def frames_per_batch(self) -> int:
        """Images per worker and step: the batch's samples, or its clips' frames."""
        return self.batch_size * (self.clip_length if self.mode == "clips" else 1)

    @property
    def cpus_needed(self) -> float:
        """Training workers plus one CPU for the Ray Data pipeline."""
        return self.num_workers * self.cpus_per_worker + 1
