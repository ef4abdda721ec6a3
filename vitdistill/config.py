"""One typed config tree: the single source of parameters.

The CLI, the Prefect flows (whose parameter *is* :class:`VitdistillConfig`, so the Prefect UI
renders it as a form), the deployments and the MLflow params all read this tree. YAML files under
``configs/`` are instances of it, and ``--set dotted.key=value`` overrides any leaf.

Each section owns its defaults; an experiment file only states what differs. Every default is
chosen so that ``vitdistill run`` with no arguments works offline on a laptop CPU.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vitdistill.errors import ConfigError
from vitdistill.textfile import decode_text


class Section(BaseModel):
    """A config section: unknown keys and wrong types are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def check_uri(value: str | None) -> str | None:
    """Reject URI schemes fsspec does not know (``foo://``), naming the scheme and the known ones."""
    if value and "://" in value:
        from fsspec.registry import known_implementations, registry

        scheme = value.split("://", 1)[0].lower()
        known = set(known_implementations) | set(registry)
        if scheme not in known:
            common = ", ".join(s for s in ("file", "s3", "gs", "az", "hf", "memory") if s in known)
            raise ValueError(f"unsupported URI scheme {scheme!r} in {value!r} (supported include {common})")
    return value


def check_root(value: str) -> str:
    """A directory or URI to write under: never empty, which would resolve to the filesystem root."""
    if not value.strip():
        raise ValueError(f"expected a directory or URI such as ./vitdistill-cache, got {value!r} (an empty root "
                         "would write to /)")
    return check_uri(value)


_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device(value: str) -> str:
    if not _DEVICE_RE.match(value):
        raise ValueError(f"expected auto, cpu, cuda, cuda:N or mps, got {value!r}")
    return value


class DataConfig(Section):
    source: Literal["digits", "shapes", "folder", "wds"] = Field(
        "digits", description="dataset registry entry; digits ships with scikit-learn, so it needs no download"
    )
    path: str | None = Field(
        None, description="folder root (source=folder) or shard pattern with braces, local or s3:// (source=wds)"
    )
    num_samples: int = Field(2000, ge=10, description="images to generate (source=shapes)")
    image_size: int = Field(64, ge=16, le=1024, description="generated image side in pixels (source=shapes)")
    seed: int = Field(0, description="seeds generation and the train/val/test split")
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="share of keys hashed into val")
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="share of keys hashed into test")
    limit: int | None = Field(None, ge=1, description="keep only the first N samples (quick runs)")
    shard_samples: int = Field(
        512, ge=1, description="images per ingested shard; each shard is one mapped extraction task"
    )
    on_error: Literal["error", "skip"] = Field(
        "error", description="corrupt/missing images: fail naming shard and key, or skip and count them"
    )

    _uri = field_validator("path")(lambda cls, v: check_uri(v))

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1 so that train is not empty")
        if self.source in ("folder", "wds") and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        return self


class TeacherConfig(Section):
    name: str | list[str] = Field(
        "effnet_lite0_imagenet",
        description="teacher registry entry, any timm model name, or SOURCE:MODEL with SOURCE one of timm, hf-hub, "
        "hf, open_clip (see `vitdistill list teachers` and the README's Teachers section); a list of them runs "
        "every stage once per teacher (the images are ingested once) and the report compares the teachers",
    )
    pretrained: bool = Field(True, description="load pretrained weights (packaged or from the hub)")
    checkpoint: str | None = Field(
        None, description="local weights for offline use: .safetensors/.pth (timm, open_clip; loaded weights-only) or "
        "a save_pretrained / hub snapshot directory (hf:, hf-hub:)"
    )
    layers: int | list[int] | None = Field(
        None, description="also cache intermediate features: N = the last N blocks (ViTs) or feature stages (CNNs), "
        "or a list of block indices, negative from the end ([-4, -1]); each block gives class token + patch mean "
        "(ViTs) or its pooled map (CNNs), stored as layers.npy and probed per layer"
    )
    batch_size: int = Field(32, ge=1, description="images per teacher forward pass")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="autocast dtype on GPU; CPU uses fp32")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: all cores)")
    num_workers: int | None = Field(
        None, ge=0, description="extraction: DataLoader processes decoding into pinned memory (default: 0 on CPU, "
        "where decoding between forward passes on all cores measured fastest; up to 8 on GPU)",
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list):
            if not v or any(not isinstance(n, str) or not n.strip() for n in v) or len(set(v)) != len(v):
                raise ValueError(f"teacher.name={v}: expected a teacher name, or a non-empty list of distinct names")
            return v[0] if len(v) == 1 else v
        if not v.strip():
            raise ValueError("teacher.name is empty: expected a teacher name (see `vitdistill list teachers`)")
        return v

    @model_validator(mode="after")
    def _one_checkpoint_one_teacher(self) -> "TeacherConfig":
        if isinstance(self.name, list) and self.checkpoint:
            raise ValueError(f"teacher.checkpoint={self.checkpoint!r} names the weights of one teacher, but teacher.name "
                             f"lists {len(self.name)}; give one teacher, or put the checkpoint in that teacher's "
                             "own registry entry")
        return self

    @property
    def names(self) -> list[str]:
        """The teachers of this run, in order: one, or each of ``teacher.name``'s list."""
        return list(self.name) if isinstance(self.name, list) else [self.name]

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, v: int | list[int] | None) -> int | list[int] | None:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"teacher.layers={v}: give the number of last blocks (>= 1) or a list of block indices")
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError(f"teacher.layers={v}: expected a non-empty list of distinct block indices")
        return v

    _device = field_validator("device")(lambda cls, v: check_device(v))


class CacheConfig(Section):
    root: str = Field("./vitdistill-cache", description="local dir or s3://bucket/prefix for shards and caches")
    dtype: Literal["float16", "float32"] = Field("float16", description="storage dtype of embeddings and logits")
    shard_bytes: int = Field(
        100_000_000, ge=1_000_000, le=4_000_000_000, description="roll feature shards over at this size"
    )
    logits_topk: int | None = Field(None, ge=1, description="store only the top-k logits (and their indices)")
    verify: bool = Field(False, description="re-hash finished shards on resume instead of trusting size + record")

    _uri = field_validator("root")(lambda cls, v: check_root(v))


class ProbeConfig(Section):
    enabled: bool = True
    normalize: bool = Field(True, description="L2-normalise embeddings before probing")
    l2_grid: list[float] | None = Field(None, description="linear-probe regularisation grid (default: log grid)")
    fewshot_shots: list[int] = Field(default_factory=lambda: [1, 5, 10, 25])
    fewshot_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    knn_k: list[int] = Field(default_factory=lambda: [10, 20])
    knn_temperature: float = Field(0.07, gt=0.0)


Optimizer = Literal["adamw", "adam", "lamb", "lion", "sgd"]
OPTIMIZER_HELP = ("optimiser, built by timm.optim.create_optimizer_v2 (sgd: momentum 0.9); the learning rates, "
                  "weight decay and schedule apply to any of them")


class LitConfig(Section):
    """LiT: the image tower is locked (embeddings are read from the feature cache); a text tower and
    projection heads are trained contrastively. Defaults train in seconds on a laptop CPU: the
    pretrained text tower is frozen, so its features are computed once per distinct text."""

    enabled: bool = True
    text_tower: str = Field(
        "minilm", description="text-tower registry entry, or open_clip:MODEL/PRETRAINED (see vitdistill.lit.list_text_towers)"
    )
    text_checkpoint: str | None = Field(
        None, description="local weights of a pretrained text tower for offline use (open_clip: the model's checkpoint file)"
    )
    freeze_text: bool = Field(
        True, description="keep a pretrained text tower frozen and train only its head (fast); false fine-tunes it"
    )
    loss: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="CLIP softmax or SigLIP sigmoid contrastive loss (see vitdistill.lit.losses)"
    )
    embed_dim: int = Field(128, ge=2, description="joint image-text space; both heads project into it")
    text_head: Literal["linear", "mlp"] = Field("mlp", description="head on the pooled text features")
    image_head: Literal["linear", "identity"] = Field(
        "linear", description="head on the locked image embedding; identity makes the joint space the image space"
    )
    epochs: int = Field(
        30, ge=1, description="passes over the training split (a frozen-tower epoch on 1,000 images takes ~20 ms)"
    )
    batch_size: int = Field(
        128, ge=2, description="images per contrastive batch; small caches need the steps more than the negatives"
    )
    lr: float = Field(2e-3, gt=0.0, description="AdamW learning rate of the heads and of a scratch tower")
    text_lr: float = Field(3e-5, gt=0.0, description="learning rate of a pretrained text tower being fine-tuned")
    temperature_lr: float = Field(
        0.05, gt=0.0, description="learning rate of the loss's log-temperature (and sigmoid bias): higher than lr "
        "so that the temperature moves within a short CPU run"
    )
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW weight decay of weight matrices")
    warmup_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="linear warm-up share of steps, then cosine")
    optimizer: Optimizer = Field("adamw", description=OPTIMIZER_HELP)
    grad_clip: float | None = Field(
        None, gt=0.0, description="clip the global gradient norm (none: no clipping; the contrastive loss is bounded)"
    )
    init_temperature: float = Field(10.0, gt=0.0, description="initial logit scale t, 10 as in LiT and SigLIP")
    init_bias: float = Field(-10.0, description="initial logit bias of the sigmoid loss, -10 as in SigLIP")
    max_text_length: int = Field(32, ge=4, description="tokens kept per text")
    scratch_width: int = Field(128, ge=8, description="width of the scratch text transformer")
    scratch_layers: int = Field(2, ge=1, description="layers of the scratch text transformer")
    scratch_heads: int = Field(4, ge=1, description="attention heads of the scratch text transformer")
    holdout_combos: bool = Field(
        True, description="on shapes, drop the HELDOUT_COMBOS (colour, shape) pairs from training; test them apart"
    )
    seed: int = Field(0, description="seeds head init, shuffling and caption draws")


class StudentConfig(Section):
    name: str = Field("vit22b_tiny", description="student registry entry or any timm model name")
    img_size: int | None = Field(
        None, ge=8, le=1024, description="student input side; default: the entry's own (64 for vit22b_*)"
    )
    pretrained: bool = Field(False, description="timm students only: start from the hub's pretrained weights")
    drop_path: float = Field(0.0, ge=0.0, lt=1.0, description="stochastic depth rate")


class DistillConfig(Section):
    """Distil the teacher into the student. Defaults train vit22b_tiny on ~1,300 digits in well under
    a minute on a 2-core CPU: two cached teacher views per image, the teacher at 64 px."""

    enabled: bool = True
    mode: Literal["online", "cached"] = Field(
        "cached", description="online: the teacher runs on every step's views; cached (FKD): teacher outputs for "
        "num_views views per image are stored once and replayed, no teacher at train time"
    )
    num_views: int = Field(
        2, ge=1, description="cached mode: augmented views stored per training image; epoch e replays view e % K"
    )
    epochs: int = Field(15, ge=1, description="passes over the training split")
    batch_size: int = Field(32, ge=1, description="images per optimiser step, over all processes")
    lr: float = Field(1e-3, gt=0.0, description="AdamW peak learning rate")
    weight_decay: float = Field(0.05, ge=0.0, description="AdamW weight decay of weight matrices")
    warmup_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="linear warm-up share of steps, then cosine")
    grad_clip: float | None = Field(1.0, gt=0.0, description="clip the global gradient norm (none: no clipping)")
    optimizer: Optimizer = Field("adamw", description=OPTIMIZER_HELP)
    ema_decay: float | None = Field(
        None, ge=0.0, lt=1.0, description="keep an EMA of the student's weights (e.g. 0.999), updated each step and "
        "checkpointed; the EMA is the student that is evaluated and returned (none: no EMA)"
    )
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 autocast on GPU; CPU trains in fp32")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps (under torchrun: the local rank's GPU)")
    alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="weight of the ground-truth cross-entropy; 1 - alpha goes to distillation"
    )
    losses: dict[str, float] = Field(
        default_factory=lambda: {"kd": 1.0, "feature": 1.0},
        description="distillation terms (loss registry: kd, hard, feature) and their weights",
    )
    temperature: float = Field(2.0, gt=0.0, description="softmax temperature of the kd loss (scaled back by T^2)")
    dist_token: bool = Field(False, description="DeiT: a distillation token whose head learns from the teacher")
    teacher_size: int | None = Field(
        None, ge=16, le=1024,
        description="side at which the teacher sees each view, if it accepts any side (CNNs; fixed-grid ViTs keep "
        "theirs); none: its own input size, the distribution it was trained on (cached mode pays it once)",
    )
    mixup: float = Field(
        0.0, ge=0.0, description="function matching's mixup: each view is mixed with a partner's view from the same "
        "shard, lambda ~ Beta(mixup, mixup), and teacher and student see the identical mixed image (0: off)",
    )
    crop_scale: tuple[float, float] = Field(
        (0.8, 1.0), description="random-resized-crop area range (digits are 8x8 px: small crops cut strokes off)"
    )
    crop_ratio: tuple[float, float] = Field((0.75, 4.0 / 3.0), description="random-resized-crop aspect range")
    hflip: float = Field(
        0.0, ge=0.0, le=1.0, description="horizontal-flip probability (0: digits are not mirror-symmetric)"
    )
    data: DataConfig | None = Field(
        None, description="the images the student distils on, if not data's train split: another (unlabelled) set "
        "with source and path like data; every image of it trains, and data's val/test still evaluate",
    )
    label_fraction: float = Field(
        1.0, ge=0.0, le=1.0, description="share of training labels used (a fixed subset by key hash), for "
        "semi-supervised runs and the data-efficiency comparison; the rest train from the teacher alone",
    )
    data_efficiency: list[float] = Field(
        default_factory=list, description="label fractions (e.g. [0.1, 1.0]) at which the stage also trains the "
        "labels-only student and scores the distilled one (its probe head refitted, else retrained), at the same "
        "budget: the report's data-efficiency figure (each fraction costs up to two more trainings)",
    )
    head: Literal["auto", "trained", "probe"] = Field(
        "auto", description="task head: trained with the labels, or a linear probe fitted on the student's own "
        "features after distillation; auto = probe when the training loss saw no label (alpha 0, no labels)",
    )
    num_workers: int = Field(
        0, ge=0, description="DataLoader worker processes that decode and render batches (0: in the training "
        "process); the data order depends on max(1, num_workers), so 0 and 1 train identically",
    )
    shuffle_buffer: int = Field(
        1024, ge=1, description="samples in each reader's shuffle buffer, after the shard order and each shard's "
        "samples are permuted per epoch (encoded bytes: memory is about this many images' files)",
    )
    checkpoint_every: int = Field(100, ge=0, description="save a checkpoint every N steps (0: only at the end)")
    resume: bool = Field(True, description="continue from the latest checkpoint of the same run, if any")
    nproc: int = Field(1, ge=1, description="processes; above 1 the stage runs under torchrun (gloo on CPU, nccl on GPU)")
    register_as: str | None = Field(
        "vitdistill-student", description="MLflow Model Registry name for the student (none: log, don't register)"
    )
    seed: int = Field(0, description="seeds the student's weights, the data order and the views")

    _device = field_validator("device")(lambda cls, v: check_device(v))

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError("distill.crop_scale must be two fractions 0 < lo <= hi <= 1")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError("distill.crop_ratio must be two aspect ratios 0 < lo <= hi")
        if any(w < 0 for w in self.losses.values()):
            raise ValueError("distill.losses weights must be >= 0")
        if any(not 0.0 < f <= 1.0 for f in self.data_efficiency):
            raise ValueError("distill.data_efficiency must be label fractions in (0, 1]")
        return self


class EvaluateConfig(Section):
    enabled: bool = True
    evaluators: list[str] = Field(
        default_factory=lambda: ["calibration", "robustness", "subgroup", "shape_bias"],
        description="evaluator registry entries (shape_bias runs on data.source=shapes only)",
    )
    image_size: int | None = Field(
        None, ge=8, le=512, description="resize test images to this side; none: native size (the distribution the "
        "probe and student were trained on), or 64 when test images differ in size",
    )
    max_images: int = Field(200, ge=10, description="test images evaluated (each is seen ~30x by robustness)")
    severities: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5], description="corruption severities")
    group_by: str = Field("auto", description="subgroups: class, an attribute (e.g. colour), or auto")
    cue_conflict_images: int = Field(216, ge=36, description="shape-bias cue-conflict images (36 per full cycle)")
    student: str | None = Field(
        None, description="the student to evaluate: an MLflow model URI (models:/vitdistill-student@champion, "
        "models:/NAME/VERSION, runs:/RUN_ID/student); none: the one this run distilled"
    )

    @field_validator("student")
    @classmethod
    def _student_uri(cls, v: str | None) -> str | None:
        v = (v or "").strip()
        if v and not v.startswith(("models:/", "runs:/")):
            raise ValueError(f"expected an MLflow model URI (models:/NAME@ALIAS, models:/NAME/VERSION or "
                             f"runs:/RUN_ID/student) or none, got {v!r}")
        return v or None


class ReportConfig(Section):
    enabled: bool = Field(True, description="write the HTML report at the end of every run that evaluates")
    out_dir: str = Field("./reports", description="local dir or s3://bucket/prefix; a report goes to <out_dir>/<run_id>/")
    stage_figures: bool = Field(True, description="also embed the figures each stage logged (confusions, curves...)")

    _uri = field_validator("out_dir")(lambda cls, v: check_root(v))


class TrackingConfig(Section):
    uri: str | None = Field(
        None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"
    )
    experiment: str = Field("vitdistill", description="MLflow experiment name")
    artifact_location: str | None = Field(None, description="artifact root for a new experiment (e.g. s3://...)")
    log_every_n_steps: int = Field(
        10, ge=0, description="training runs log step/loss, step/lr, ... every N optimiser steps, live (0: epochs only)"
    )
    system_metrics: bool = Field(True, description="log CPU, memory, disk, network (and GPU) use during training")
    system_metrics_interval: float = Field(
        5.0, ge=0.5, description="seconds between system-metric samples (a training shorter than this logs none)"
    )
    champion_metric: str = Field(
        "student_top1", description="distill metric that decides whether a new registered version becomes champion"
    )
    champion_mode: Literal["max", "min"] = Field("max", description="max: higher champion_metric is better; min: lower")

    server_backend_store_uri: str = Field(
        "sqlite:///mlflow.db", description="`vitdistill up`: the MLflow server's store (sqlite or postgresql://...)"
    )
    server_artifacts_destination: str = Field(
        "./mlartifacts", description="`vitdistill up`: where the MLflow server keeps artifacts (local dir or s3://...)"
    )

    def resolved_uri(self) -> str:
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


class OrchestrationConfig(Section):
    task_runner: Literal["thread", "dask"] = Field("thread", description="runner for mapped tasks")
    max_workers: int = Field(1, ge=1, description="thread-pool size for mapped tasks")
    stage_concurrency: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="stages of the graph that run at once (probe, LiT and distillation after extraction); "
        "auto: min(3, cpus // 4) without a GPU, so each stage's torch threads get 4 cores (1 on a laptop), "
        "min(3, cpus // 2, 2 * gpus) with GPUs")
    dask_address: str | None = Field(None, description="tcp://host:port of a Dask scheduler; none = local cluster")
    dask_workers: int = Field(2, ge=1, description="workers of the local Dask cluster")
    keep_api_s: float = Field(300.0, ge=0, description="the embedded (ephemeral) Prefect API of a command stays up "
                              "this long after the last command using it ended, so the next one starts at once; "
                              "0: started and stopped with each command")
    host: str = Field("127.0.0.1", description="`vitdistill up` binds its servers here (loopback unless told otherwise)")
    prefect_port: int = Field(4200, ge=1, le=65535, description="`vitdistill up`: Prefect server port")
    mlflow_port: int = Field(5000, ge=1, le=65535, description="`vitdistill up`: MLflow server port")
    work_pool: str = Field("vitdistill-process", description="process work pool of the deployments and the worker")
    state_dir: str = Field(".vitdistill", description="`vitdistill up/down`: PIDs and server logs")


class VitdistillConfig(Section):
    """The whole pipeline's parameters."""

    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    lit: LitConfig = Field(default_factory=LitConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)

    def for_teacher(self, name: str) -> "VitdistillConfig":
        """This config with one of ``teacher.name``'s teachers: what each stage of a several-teacher run gets."""
        if name not in self.teacher.names:
            raise ConfigError(f"teacher {name!r} is not one of teacher.name {self.teacher.names}")
        cfg = self.model_copy(deep=True)
        cfg.teacher.name = name
        return cfg


# --------------------------------------------------------------------------- loading


def _format_validation_error(err: ValidationError, origin: str) -> str:
    """Render pydantic errors as one line: ``origin: key: what was expected``."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key {loc!r}{_valid_keys_hint(e['loc'])}")
        elif e["type"] == "value_error":
            parts.append(f"{loc + ': ' if loc else ''}{e['msg'].removeprefix('Value error, ')}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, (dict, list)) else f", got {got!r}"
            parts.append(f"{loc}: {e['msg'].lower()}{got_s}")
    return f"{origin}: " + "; ".join(parts)


def _valid_keys_hint(loc: tuple) -> str:
    model: type[BaseModel] = VitdistillConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return ""
        model = field.annotation
    return f" (valid keys here: {', '.join(model.model_fields)})"


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3); the value is read as a YAML scalar/list."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _apply(tree: dict, path: list[str], value: Any, origin: str) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {'.'.join(path[: i + 1])} is a value, not a section")
        node = child
    node[path[-1]] = value


def _read_yaml(p: Path) -> Any:
    """The YAML document in ``p``; an unreadable, binary or invalid file is one ConfigError naming it."""
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file ({e.strerror or e})") from None
    text = decode_text(data, str(p), ConfigError, expected="a YAML config")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        if isinstance(e, yaml.reader.ReaderError):
            problem = f"unacceptable character #x{e.character:04x} at position {e.position}"
        else:
            problem = getattr(e, "problem", None) or getattr(e, "context", None) or type(e).__name__
        raise ConfigError(f"{p}:{where} is not valid YAML ({' '.join(str(problem).split())})") from None
    except RecursionError:
        raise ConfigError(f"{p}: not valid YAML (nested too deeply)") from None


def _merge(base: dict, over: dict) -> dict:
    """Sections merge key by key; any other value (lists included) is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | os.PathLike | list | tuple | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> VitdistillConfig:
    """Defaults <- YAML file(s), each over the one before (a data config, then a recipe) <- ``--set``
    overrides, validated once."""
    paths = [] if path is None else [path] if isinstance(path, (str, os.PathLike)) else list(path)
    tree: dict = {}
    for p in map(Path, paths):
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        loaded = _read_yaml(p)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level, got {type(loaded).__name__}")
        tree = _merge(tree, loaded)
    origin = " + ".join(str(p) for p in paths) or "config"
    for item in overrides:
        keys, value = parse_override(item)
        _apply(tree, keys, value, f"--set {item}")
    if overrides:
        origin = f"{origin} (with --set)" if paths else "--set"
    return validate_config(tree, origin)


def validate_config(tree: dict, origin: str = "config") -> VitdistillConfig:
    try:
        return VitdistillConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, origin)) from None


def flatten(cfg: BaseModel | dict, prefix: str = "") -> dict[str, Any]:
    """``{"data.source": "digits", ...}``: the form MLflow logs as params."""
    tree = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def to_yaml(cfg: VitdistillConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
