"""Configuration: frozen dataclasses validated on construction, to and from YAML.

Every value docs/design.md marks *(chosen)* lives here, never as a literal in model or engine code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from dmdd.errors import ConfigError

Branches = Literal["both", "normality", "abnormality"]


def _coerce_fields(obj: object) -> None:
    """Check and convert option values by their annotated type.

    YAML reads ``1e-4`` as a string and ``5`` as an int; a float option accepts both numbers and numeric strings, an
    int option only whole numbers, a bool option only true/false. YAML also reads an unquoted ``on`` / ``off`` as a
    boolean: a text option takes them back as ``"on"`` / ``"off"``. Anything else is a ``ConfigError`` naming the
    option.
    """
    section = type(obj).__name__.removesuffix("Config").lower() or "config"
    for f in fields(obj):
        value, kind = getattr(obj, f.name), str(f.type)
        if value is None and "None" in kind:
            continue
        name = f"{section}.{f.name}"
        if kind.startswith("float"):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{name} must be a number, got {value!r}") from None
        elif kind.startswith("int"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be a whole number, got {value!r}")
        elif kind == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        elif kind.startswith("str") and isinstance(value, bool):
            value = "on" if value else "off"
        object.__setattr__(obj, f.name, value)


ForegroundPolicy = Literal["auto", "object", "texture"]


def _stage_set(name: str, value: Any) -> tuple[int, ...]:
    """A sorted, non-empty tuple of distinct stage numbers in 1..4, or a ConfigError naming ``model.<name>``."""
    try:
        stages = tuple(sorted({int(i) for i in value}))
    except (TypeError, ValueError):
        raise ConfigError(f"model.{name} must be stage numbers 1..4, got {value!r}") from None
    if not stages or not set(stages) <= {1, 2, 3, 4}:
        raise ConfigError(f"model.{name} must be a non-empty subset of 1..4, got {value!r}")
    return stages


@dataclass(frozen=True)
class ModelConfig:
    """Networks (docs/design.md §1, §4).

    Attributes:
        backbone: registered backbone name (``wide_resnet50_2`` is the paper's).
        pretrained: load ImageNet weights (torchvision download or the packaged Lite weights).
        weights: optional local weights file for the backbone; overrides ``pretrained``.
        image_size: square input size; a multiple of 32 so the four stages halve exactly.
        resize: how an image of any aspect ratio becomes the square input: ``squash`` (stretch), ``pad`` (keep the
            aspect ratio, black borders) or ``crop`` (keep the aspect ratio, centre crop); the same in training,
            test, predict and export, and maps are mapped back to each image's own pixels. Not used with tiles.
        tile: 0 (default): each image becomes one square of ``image_size``. Otherwise the image (scaled by
            ``tile_scale``) is cut into square tiles of this many pixels, each brought to ``image_size``: training
            draws tiles at random positions, inference scores a grid of tiles overlapping by ``tile_overlap`` (a
            share of the tile) and stitches their maps; the image score is the largest tile score
            (``dmdd.data.tiles``). For defects a few dozen pixels wide in images of several megapixels.
        tile_overlap: share of a tile shared with its neighbour on the inference grid, in [0, 0.9].
        tile_scale: factor applied to the image before tiling, in (0, 4] (e.g. 0.5 halves a 20 MP image's sides).
        branches: ``both`` (DMDD), or one branch only (Table 4 ablation).
        pmn_inner: Pyramid Modeling Network inner path.
        pmn_outer: Pyramid Modeling Network outer path.
        msn: Multi-perception Segmentation Network (the paper's fusion). Off (dmdd's default, a deviation: on
            real defects the trained head was worse than the plain sum, docs/deviations.md) gives the smoothed sum
            of the standardised maps, scored as ``image_score`` says.
        pyramid_upsampling: fuse stage maps top-down (NGM) / bottom-up (AIM) before upsampling.
        multi_perception: channel, spatial and global attention in the segmentation head.
        seg_channels: width of the channel-compression conv stack.
        top_k: number of largest map values averaged into the image score (paper: 100).
        image_score: how the plain-sum map (``msn`` off) becomes the image score: ``top_k`` (the mean of its
            ``top_k`` largest values, as the paper scores the MSN output; chosen, docs/deviations.md) or ``max``
            (checkpoints written before this option). The MSN output is always scored by its top-k mean.
        global_score: an image-level score from a Gaussian of each teacher stage's pooled features, fitted on the
            training images: ``mean`` (per-channel means over positions; default), ``mean_std`` (means and
            standard deviations), or ``off`` (the map's score alone, as in the paper; use it where the whole look of
            good parts drifts, e.g. lighting, since a global score flags such drift). When on, the image score is the
            larger of the map's score and this one, each standardised on good images (deviation, docs/deviations.md;
            see :mod:`dmdd.models.global_score`). The anomaly map does not change.
        global_stages: the teacher stages whose pooled features the global score uses; the first is left out by
            default (*chosen*: its channel means are colour and brightness statistics, the weakest evidence on both
            development sets and the one most moved by a change of capture session, docs/deviations.md).
        regional_score: a regional texture-statistics map added to the anomaly map (window means and standard
            deviations of teacher stages 2-3 scored against one Gaussian of training windows, see
            :mod:`dmdd.models.regional`): ``auto`` (default) turns it on when the synthesis' foreground policy finds
            a texture and off for objects (the resolved value is what the checkpoint stores), ``on``, or ``off``
            (the paper's maps alone). Deviation, docs/deviations.md.
        regional_bank: training windows kept per stage (greedy k-centre selection) for the regional map, which
            scores each window by its distance to the nearest of them in the Gaussian's metric; 0 scores the
            distance to the Gaussian's mean (checkpoints written before the bank read as 0). Deviation,
            docs/deviations.md.
        regional_windows: the regional map's window sides, in cells of teacher stages 2 and 3 (odd): 7 and 5 by
            default (7 x 8 and 5 x 16 pixels at 256 px). A larger stage-3 window sees defects that change a large
            area a little (magnetic_tile's "uneven"), a smaller one keeps small defects sharp; ``dmdd calibrate
            --choose-map`` can widen the stage-3 window where labelled rejects with masks show it helps
            (docs/deviations.md).
        foreground_support: multiply the anomaly map by where the object can be: the union of the training
            images' foreground masks, dilated and smoothed (:mod:`dmdd.models.support`). ``auto`` (default) turns it
            on for objects (the synthesis' foreground policy) without tiles and off otherwise (the checkpoint stores
            the resolved value), ``on`` (objects only), or ``off`` (the paper's map). Deviation, docs/deviations.md.
        student_bn_frozen: keep the student's BatchNorm statistics at their pretrained values
            (affine parameters still train). *(chosen)*: keeps student = teacher at initialisation,
            is robust to small batches and needs no SyncBatchNorm under DDP.
        map_normalization: standardise each of the K maps by the mean and standard deviation of its values on
            held-out good training images before they are summed or fused (deviation, docs/deviations.md).
        msn_residual: the MSN adds a learned correction to the logit of the (normalised) plain sum, with the
            correction starting at zero, so it starts as the plain sum (deviation); false: the paper's head alone.
        global_attention_size: side of the MSN's global attention grid G (K x g x g, bilinearly upsampled to the
            map size); 0 uses the full map size, as in the paper.
        map_stages: which stages' maps (of each branch) enter the fusion; all four are still trained.
        fused_stages: of ``map_stages``, the stages whose maps the plain sum adds up (``null``: all of them). All
            ``map_stages`` maps are still computed and standardised, so this can change on a trained model:
            ``dmdd calibrate --choose-map`` sets it from labelled rejects with masks (deviation,
            docs/deviations.md). Needs ``msn: false`` (the MSN weighs its input maps itself).
        map_sigma: Gaussian smoothing (standard deviation in pixels at ``image_size``) of the final anomaly map;
            0 turns it off.
    """

    backbone: str = "wide_resnet50_2"
    pretrained: bool = True
    weights: str | None = None
    image_size: int = 256
    resize: str = "squash"
    tile: int = 0
    tile_overlap: float = 0.25
    tile_scale: float = 1.0
    branches: Branches = "both"
    pmn_inner: bool = True
    pmn_outer: bool = True
    msn: bool = False
    pyramid_upsampling: bool = True
    multi_perception: bool = True
    seg_channels: int = 16
    top_k: int = 100
    image_score: str = "top_k"
    global_score: str = "mean"
    global_stages: tuple[int, ...] = (2, 3, 4)
    regional_score: str = "auto"
    regional_bank: int = 4096
    regional_windows: tuple[int, ...] = (7, 5)
    foreground_support: str = "auto"
    student_bn_frozen: bool = True
    map_normalization: bool = True
    msn_residual: bool = True
    global_attention_size: int = 8
    map_stages: tuple[int, ...] = (1, 2, 3, 4)
    fused_stages: tuple[int, ...] | None = None
    map_sigma: float = 4.0

    def __post_init__(self) -> None:
        _coerce_fields(self)
        for name in ("map_stages", "global_stages"):
            object.__setattr__(self, name, _stage_set(name, getattr(self, name)))
        if self.fused_stages is not None:
            object.__setattr__(self, "fused_stages", _stage_set("fused_stages", self.fused_stages))
            if not set(self.fused_stages) <= set(self.map_stages):
                raise ConfigError(f"model.fused_stages {list(self.fused_stages)} must be a subset of model.map_stages "
                                  f"{list(self.map_stages)}")  # fmt: skip
            if self.msn:
                raise ConfigError("model.fused_stages needs model.msn: false (the MSN weighs its input maps itself); "
                                  "remove fused_stages or turn the MSN off")  # fmt: skip
        if self.resize not in ("squash", "pad", "crop"):
            raise ConfigError(f"model.resize must be squash|pad|crop, got {self.resize!r}")
        if self.global_attention_size < 0 or self.map_sigma < 0:
            raise ConfigError("model.global_attention_size and model.map_sigma must be >= 0")
        if self.image_size < 32 or self.image_size % 32:
            raise ConfigError(f"model.image_size must be a positive multiple of 32, got {self.image_size}")
        if self.tile != 0 and self.tile < 32:
            raise ConfigError(f"model.tile (--tile) must be 0 (off) or at least 32 pixels, got {self.tile}")
        if not 0 <= self.tile_overlap <= 0.9:
            raise ConfigError(f"model.tile_overlap (--tile-overlap) must be in [0, 0.9], got {self.tile_overlap}")
        if not 0 < self.tile_scale <= 4:
            raise ConfigError(f"model.tile_scale (--tile-scale) must be in (0, 4], got {self.tile_scale}")
        if self.branches not in ("both", "normality", "abnormality"):
            raise ConfigError(f"model.branches must be both|normality|abnormality, got {self.branches!r}")
        if self.image_score not in ("top_k", "max"):
            raise ConfigError(f"model.image_score must be top_k|max, got {self.image_score!r}")
        if self.global_score not in ("off", "mean", "mean_std"):
            raise ConfigError(f"model.global_score must be off|mean|mean_std, got {self.global_score!r}")
        if self.regional_score not in ("auto", "on", "off"):
            raise ConfigError(f"model.regional_score must be auto|on|off, got {self.regional_score!r}")
        if self.regional_bank < 0:
            raise ConfigError(f"model.regional_bank must be >= 0 (0: the distance to the mean), got {self.regional_bank}")
        windows = self.regional_windows
        try:
            windows = tuple(int(k) for k in windows)
        except (TypeError, ValueError):
            windows = ()
        if len(windows) != 2 or not all(k >= 1 and k % 2 for k in windows):
            raise ConfigError(f"model.regional_windows must be two odd window sides (stages 2 and 3, in cells), got "
                              f"{self.regional_windows!r}")  # fmt: skip
        object.__setattr__(self, "regional_windows", windows)
        if self.foreground_support not in ("auto", "on", "off"):
            raise ConfigError(f"model.foreground_support must be auto|on|off, got {self.foreground_support!r}")
        if self.foreground_support == "on" and self.tile:
            raise ConfigError("model.foreground_support: on needs whole images; with tiles (model.tile) use auto or off")
        if self.top_k < 1 or self.seg_channels < 1:
            raise ConfigError("model.top_k and model.seg_channels must be >= 1")


@dataclass(frozen=True)
class SynthesisConfig:
    """Foreground-aware Anomaly Synthesis (docs/design.md §2).

    Attributes:
        texture_dir: folder of texture images (DTD); ``None`` uses procedural textures.
        fas: restrict anomalies to the foreground; ``False`` is the "-FAS" ablation.
        foreground: ``auto`` (object when GrabCut covers < ``object_max_coverage``), ``object`` or ``texture``.
        perlin_max_scale_exp: Perlin scale 2^k with k ~ U{0..this} (DRAEM and docs/design.md §2: 0..5).
        perlin_threshold: threshold on the rotated Perlin noise.
        beta_max: blend opacity β ~ U(0, beta_max).
        grabcut_iterations: GrabCut iterations.
        grabcut_size: GrabCut runs on a copy at most this large (speed); the mask is resized back.
        object_max_coverage: auto policy: foreground coverage under which a category is an object.
        object_max_coverage_cv: auto policy: largest coefficient of variation of the coverage across images
            for an object category.
        object_max_crossings: auto policy: most foreground/background changes per image line for an object.
        min_foreground_coverage: GrabCut results covering less of the image fall back to Otsu, then to the whole
            image (0.2 %: a small part on a large plain background is an object, docs/deviations.md).
        max_foreground_coverage: GrabCut results covering more of the image fall back the same way.
        max_mask_tries: bounded resampling of the Perlin mask when M is empty.
        foreground_cache_dir: optional disk cache for foreground masks.
        grey_textures_on_grey: turn the texture grey when the normal image is grey (equal channels), so grey
            data sets do not learn "colour = defect" (chosen).
    """

    texture_dir: str | None = None
    fas: bool = True
    foreground: ForegroundPolicy = "auto"
    perlin_max_scale_exp: int = 5
    perlin_threshold: float = 0.5
    beta_max: float = 0.8
    grabcut_iterations: int = 5
    grabcut_size: int = 128
    object_max_coverage: float = 0.9
    object_max_coverage_cv: float = 0.25
    object_max_crossings: float = 6.0
    min_foreground_coverage: float = 0.002
    max_foreground_coverage: float = 0.98
    max_mask_tries: int = 10
    foreground_cache_dir: str | None = None
    grey_textures_on_grey: bool = True

    def __post_init__(self) -> None:
        _coerce_fields(self)
        if self.foreground not in ("auto", "object", "texture"):
            raise ConfigError(f"synthesis.foreground must be auto|object|texture, got {self.foreground!r}")
        if not 0 <= self.beta_max < 1:
            raise ConfigError("synthesis.beta_max must be in [0, 1)")
        if not 0 <= self.perlin_max_scale_exp <= 8:
            raise ConfigError("synthesis.perlin_max_scale_exp must be in 0..8")
        if not 0 <= self.min_foreground_coverage < self.max_foreground_coverage <= 1:
            raise ConfigError("synthesis.min_foreground_coverage and max_foreground_coverage must satisfy "
                              f"0 <= min < max <= 1, got {self.min_foreground_coverage} and "
                              f"{self.max_foreground_coverage}")  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run control (docs/design.md §5).

    Attributes:
        epochs: number of epochs; each trains the student side, then the segmentation head. The training length
            when neither ``steps`` nor ``minutes`` is set.
        steps: total student optimiser steps (0: ``epochs`` x steps per epoch). The last epoch may be partial.
        minutes: wall-clock budget (0: none) covering setup, training and the final calibration. The total number
            of steps is re-planned from the measured speed after every epoch (student and segmentation phases
            together) and, in a single process, after every step; the plan is stored, so a resumed run keeps it.
        lr_schedule: ``constant`` (paper: no schedule stated) or ``cosine`` decay to 0 over the total steps.
        warmup_steps: linear learning-rate warm-up of the student side over this many steps.
        ema_decay: exponential moving average of the student side's weights, used for the maps, statistics and
            thresholds while the optimiser trains the raw weights (``dmdd.training.averaging``); 0 = off (paper: none).
            Chosen 0.99: at the paper's constant learning rate the last weights' maps swing from snapshot to
            snapshot; the average's do not (docs/results.md, docs/deviations.md).
        update_clip: per tensor, divide the student's step size by ``max(1, RMS(g^2 / v_hat))`` (Adafactor's update
            clipping, ``dmdd.training.stability``) so no tensor moves much further than usual when Adam's second moment is
            out of date (paper: plain Adam). Off by default: at 500 steps it cost 1.3 AU-PRO on tire and 0.6
            P-AUROC on magnetic_tile (docs/results.md).
        ema_gate: with ``ema_decay``, leave a step out of the weight average when its loss exceeds this multiple of
            the running loss level; 0 = off (paper: none). Chosen 2: it leaves the raw training untouched and kept
            the average clear of a loss spike (docs/results.md, docs/deviations.md).
        spike_rollback: with ``ema_gate``, after this many gated steps in a row copy the average into the training
            weights and clear Adam's moments, so training continues from before the spike; 0 = off (paper: none).
            Chosen 5: of three tire runs with a spike it rescued two (P-AUROC / AU-PRO +6.3 / +21.4 and +5.3 / +17.8)
            and cost one 0.2 / 0.9; a run without five gated steps in a row is unchanged (docs/deviations.md).
        step_log: write ``step_log.jsonl`` beside the checkpoint, one line per student step (losses, gradient norm,
            the largest RMS(g^2 / v_hat) of a tensor against Adam's second moments and which tensor, the batch's
            synthetic-anomaly area), to diagnose loss spikes; costs one pass over the gradients per step.
        snapshot_every: also keep a copy of the model every this many student steps (at the end of the epoch that
            crosses the mark) in ``snapshots/`` for learning curves; 0 keeps none.
        batch_size: normal/anomalous pairs per step.
        lr: Adam learning rate of the new student parts (1x1 convs, PMN) (paper: 0.005).
        lr_pretrained: learning rate of the pretrained student stages (paper: the same 0.005).
        betas: Adam betas of the student side (chosen, after RD).
        seg_lr: Adam learning rate of the segmentation head (chosen).
        seg_steps: segmentation steps at the end of every epoch (0: ``seg_fraction`` of the epoch's student steps).
        seg_fraction: segmentation steps per student step when ``seg_steps`` is 0 (chosen: 0.25; one segmentation
            step costs about as much as a student step, and the residual head starts at the plain sum).
        ngm_weight: weight of L_NGM.
        aim_weight: weight of L_AIM.
        seed: one seed reproduces a run on CPU.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        amp: bfloat16 autocast of the training forward passes (CUDA or CPU); maps and losses in fp32.
        channels_last: model and batches in channels-last memory layout while training (chosen: a Lite0 student
            step took 2.85 s instead of 4.54 s on 2 CPU cores, docs/results.md; the same result up to
            float rounding).
        num_threads: ``torch.set_num_threads``; ``None`` leaves the default.
        num_workers: DataLoader workers.
        holdout_fraction: share of the training images held out to calibrate thresholds and to standardise maps.
        threshold_mode: ``normal``: thresholds from held-out good images alone, at a target false-alarm rate;
            ``synthetic``: the image threshold separates held-out good images from synthetic anomalies made from
            them (max TPR - FPR) and the pixel threshold maximises pixel F1 on their masks.
        target_fpr: ``normal`` mode: share of good images allowed above the image threshold.
        pixel_target_fpr: ``normal`` mode: share of good pixels allowed above the pixel threshold.
        eval_size: size at which pixel metrics are computed.
    """

    epochs: int = 100
    steps: int = 0
    minutes: float = 0.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    ema_decay: float = 0.99
    update_clip: bool = False
    ema_gate: float = 2.0
    spike_rollback: int = 5
    step_log: bool = False
    snapshot_every: int = 0
    batch_size: int = 16
    lr: float = 0.005
    lr_pretrained: float = 0.005
    betas: tuple[float, float] = (0.5, 0.999)
    seg_lr: float = 1e-3
    seg_steps: int = 0
    seg_fraction: float = 0.25
    ngm_weight: float = 1.0
    aim_weight: float = 1.0
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    channels_last: bool = True
    num_threads: int | None = None
    num_workers: int = 0
    holdout_fraction: float = 0.1
    threshold_mode: str = "normal"
    target_fpr: float = 0.01
    pixel_target_fpr: float = 0.001
    eval_size: int = 256

    def __post_init__(self) -> None:
        _coerce_fields(self)
        try:
            object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        except (TypeError, ValueError):
            raise ConfigError(f"train.betas must be two numbers, got {self.betas!r}") from None
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("train.epochs and train.batch_size must be >= 1")
        if self.steps < 0 or self.minutes < 0 or self.warmup_steps < 0 or self.snapshot_every < 0:
            raise ConfigError("train.steps, train.minutes, train.warmup_steps and train.snapshot_every must be >= 0")
        if not 0 < self.seg_fraction <= 10:
            raise ConfigError("train.seg_fraction must be in (0, 10]")
        if self.threshold_mode not in ("normal", "synthetic"):
            raise ConfigError(f"train.threshold_mode must be normal|synthetic, got {self.threshold_mode!r}")
        if not (0 < self.target_fpr < 1 and 0 < self.pixel_target_fpr < 1):
            raise ConfigError("train.target_fpr and train.pixel_target_fpr must be in (0, 1)")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"train.lr_schedule must be constant|cosine, got {self.lr_schedule!r}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.ema_gate and self.ema_gate <= 1:
            raise ConfigError(f"train.ema_gate must be 0 (off) or > 1, got {self.ema_gate!r}")
        if self.spike_rollback < 0:
            raise ConfigError(f"train.spike_rollback must be 0 (off) or a number of steps, got {self.spike_rollback!r}")
        if not 0 <= self.holdout_fraction < 1:
            raise ConfigError("train.holdout_fraction must be in [0, 1)")


@dataclass(frozen=True)
class DataConfig:
    """Where the data is.

    Attributes:
        root: dataset root (with ``category``) or a category folder itself.
        category: category name under ``root``; ``None`` when ``root`` is the category.
        layout: ``auto``, ``mvtec``, ``btad``, ``visa``, ``mvtec3d`` or ``folder``.
    """

    root: str | None = None
    category: str | None = None
    layout: str = "auto"


@dataclass(frozen=True)
class Config:
    """The full, resolved configuration of a run; stored in every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["train"]["betas"] = list(self.train.betas)
        out["model"]["map_stages"] = list(self.model.map_stages)
        if self.model.fused_stages is not None:
            out["model"]["fused_stages"] = list(self.model.fused_stages)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        sections = {f.name: f.type for f in fields(cls)}
        unknown = set(raw) - set(sections)
        if unknown:
            raise ConfigError(f"unknown config section(s): {sorted(unknown)}; expected {sorted(sections)}")
        kwargs = {}
        for name, section_cls in _SECTION_TYPES.items():
            values = raw.get(name) or {}
            allowed = {f.name for f in fields(section_cls)}
            bad = set(values) - allowed
            if bad:
                raise ConfigError(f"unknown option(s) in config section {name!r}: {sorted(bad)}")
            kwargs[name] = section_cls(**values)
        return cls(**kwargs)

    def replace(self, **sections: dict[str, Any]) -> Config:
        """A copy with some fields changed, e.g. ``cfg.replace(train={"epochs": 3})``."""
        new = {}
        for name, changes in sections.items():
            new[name] = dataclasses.replace(getattr(self, name), **changes)
        return dataclasses.replace(self, **new)


_SECTION_TYPES = {"model": ModelConfig, "synthesis": SynthesisConfig, "train": TrainConfig, "data": DataConfig}


def load_config(path: str | Path) -> Config:
    """Read a YAML config file; missing options take their defaults."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return Config.from_dict(raw)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
