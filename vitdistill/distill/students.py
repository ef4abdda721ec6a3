"""Students: a registry of small ViT-22B-style ViTs plus any timm model, wrapped with distillation heads.

    student = create_student(StudentConfig(name="vit22b_tiny"), num_classes=10, teacher_dim=1280,
                             teacher_classes=1000)
    out = student(x)   # {"emb": (B, D), "logits": (B, 10), "kd_logits": (B, 1000), "feat": (B, 1280)}

The ViT-22B recipe (Dehghani et al. 2023) at toy scale, built from timm parts: the attention and
the MLP of a block run in parallel on one shared pre-norm (``y = x + attn(norm(x)) + mlp(norm(x))``),
queries and keys are LayerNorm-ed per head (timm's ``qk_norm``), and neither the QKV projection nor
any LayerNorm has a bias.

The wrapper owns the heads, so a backbone never needs to know about the teacher:

- ``head``: task logits on the student's pooled embedding, trained on ground-truth labels;
- ``kd_head``: logits in the teacher's label space, trained on the teacher's logits. When the
  label spaces agree (same class count) and there is no distillation token, ``head`` plays both
  roles, as in classic KD;
- ``proj``: a linear map from the student's embedding to the teacher's, for feature distillation;
- with ``dist_token`` (DeiT), ``kd_head`` reads a second, distillation token; at eval time, in a
  shared label space, the task logits are the mean of both heads.
"""

from __future__ import annotations

import difflib
from functools import partial
from typing import Any, Callable

import torch
from timm.layers import Attention, DropPath, Mlp
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitdistill.config import StudentConfig
from vitdistill.errors import ConfigError, RegistryError
from vitdistill.registry import Registry
from vitdistill.seeding import seeded

# One LayerNorm everywhere (blocks, qk-norm, final norm): no bias, as in ViT-22B.
BiaslessLayerNorm = partial(nn.LayerNorm, eps=1e-6, bias=False)


class ParallelBlock(nn.Module):
    """ViT-22B block: ``x + attn(norm(x)) + mlp(norm(x))`` with one shared pre-norm.

    Its arguments mirror timm's ``Block`` so that ``VisionTransformer(block_fn=ParallelBlock)``
    builds it; layer scale is not part of the recipe and is refused.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_norm: bool = True,
        scale_attn_norm: bool = False,
        scale_mlp_norm: bool = False,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = BiaslessLayerNorm,
        mlp_layer: type[nn.Module] = Mlp,
        attn_layer: Any = None,
        depth: int = 0,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if init_values or scale_attn_norm or scale_mlp_norm:
            raise ConfigError("ParallelBlock: layer scale and scale norms are not part of the ViT-22B block")
        dd = {"device": device, "dtype": dtype}
        self.norm = norm_layer(dim, **dd)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, proj_bias=proj_bias,
                              attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=norm_layer, **dd)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                             bias=proj_bias, drop=proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        y = self.norm(x)  # (B, T, D), shared by both branches
        return x + self.drop_path(self.attn(y, attn_mask=attn_mask, is_causal=is_causal) + self.mlp(y))


def vit22b(img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int, *,
           dist_token: bool = False, drop_path: float = 0.0) -> VisionTransformer:
    """A ViT-22B-style backbone without a classifier (``num_classes=0``): forward gives (B, D)."""
    cls = VisionTransformerDistilled if dist_token else VisionTransformer
    return cls(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
               mlp_ratio=4.0, qkv_bias=False, qk_norm=True, num_classes=0, global_pool="token",
               norm_layer=BiaslessLayerNorm, block_fn=ParallelBlock, drop_path_rate=drop_path)


STUDENTS: Registry[nn.Module] = Registry("student")


@STUDENTS.register("vit22b_tiny")
def vit22b_tiny(img_size: int | None = None, **kw: Any) -> VisionTransformer:
    """0.8 M parameters: 32 px in 8 px patches (16 tokens), width 128, 4 blocks; ~10 ms per image
    forward + backward on one CPU core (64 px: 4x the tokens, ~4x the cost)."""
    return vit22b(img_size or 32, 8, 128, 4, 4, **kw)


@STUDENTS.register("vit22b_small")
def vit22b_small(img_size: int | None = None, **kw: Any) -> VisionTransformer:
    """~3.6 M parameters: 64 px in 8 px patches, width 192, 8 blocks."""
    return vit22b(img_size or 64, 8, 192, 8, 3, **kw)


def list_students(pattern: str = "*") -> list[str]:
    """Registered students; any timm model name (``timm.list_models()``) is accepted as well."""
    return STUDENTS.list(pattern)


def create_backbone(cfg: StudentConfig, dist_token: bool = False, seed: int = 0) -> nn.Module:
    """The student's feature extractor: forward (B, 3, S, S) -> pooled (B, D); ``num_features`` = D."""
    with seeded(seed):  # initial weights depend on the config only
        if cfg.name in STUDENTS:
            return STUDENTS.create(cfg.name, img_size=cfg.img_size, dist_token=dist_token, drop_path=cfg.drop_path)
        import timm

        if not timm.is_model(cfg.name):
            close = difflib.get_close_matches(cfg.name, timm.list_models(), n=3)
            hint = f"; close timm names: {', '.join(close)}" if close else ""
            raise RegistryError(STUDENTS.unknown_message(cfg.name, extra=f", or any timm model name{hint}"))
        if dist_token:
            raise ConfigError(f"distill.dist_token needs a ViT student from the registry ({', '.join(list_students())}), "
                              f"not timm {cfg.name!r}")
        kw: dict[str, Any] = {"num_classes": 0, "pretrained": cfg.pretrained}
        if cfg.img_size is not None and "vit" in cfg.name:
            kw["img_size"] = cfg.img_size
        if cfg.drop_path:
            kw["drop_path_rate"] = cfg.drop_path
        try:
            return timm.create_model(cfg.name, **kw)
        except Exception as e:  # hub failures and bad kwargs come in many types
            raise ConfigError(f"student {cfg.name!r}: timm could not build it ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160]}); offline, set student.pretrained=false") from None


def input_spec(backbone: nn.Module, cfg: StudentConfig) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(square input side, mean, std): registry students train from scratch on [-1, 1]; timm models
    keep their pretrained normalisation; ``student.img_size`` overrides the side."""
    if cfg.name in STUDENTS:
        return int(backbone.patch_embed.img_size[0]), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    from timm.data import resolve_data_config

    dc = resolve_data_config({}, model=backbone)
    return cfg.img_size or int(dc["input_size"][-1]), tuple(dc["mean"]), tuple(dc["std"])


class ProbeHead(nn.Module):
    """A task head that is a fitted linear probe on the student's own embedding (students distilled without
    labels): ``W ((x / |x| - mean) * scale) + b``, as :class:`vitdistill.probes.linear.LinearClassifier`."""

    def __init__(self, clf) -> None:
        super().__init__()
        self.normalize = bool(clf.normalize)
        for name in ("mean", "scale", "weight", "bias"):
            self.register_buffer(name, torch.as_tensor(getattr(clf, name), dtype=torch.float32))

    @classmethod
    def of_shape(cls, num_classes: int, dim: int, normalize: bool) -> ProbeHead:
        """An unfitted head of this shape, for ``load_state_dict``."""
        from types import SimpleNamespace

        z = torch.zeros
        return cls(SimpleNamespace(normalize=normalize, mean=z(dim), scale=z(dim), weight=z(num_classes, dim),
                                   bias=z(num_classes)))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        x = emb.float()
        if self.normalize:
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return ((x - self.mean) * self.scale) @ self.weight.T + self.bias  # (B, C)


class Student(nn.Module):
    """Backbone + task head + optional teacher-space head, projection and DeiT distillation token."""

    def __init__(self, backbone: nn.Module, num_classes: int, teacher_dim: int, teacher_classes: int, *,
                 img_size: int, mean: tuple[float, ...], std: tuple[float, ...], kd_head: bool, feature_head: bool,
                 dist_token: bool) -> None:
        super().__init__()
        dim = int(backbone.num_features)
        self.backbone = backbone
        self.img_size, self.mean, self.std = img_size, mean, std
        self.dist_token = dist_token
        self.shared_label_space = teacher_classes == num_classes
        self.head = nn.Linear(dim, num_classes)
        separate = kd_head and teacher_classes > 0 and (dist_token or not self.shared_label_space)
        self.kd_head = nn.Linear(dim, teacher_classes) if separate else None
        self.has_kd_logits = kd_head and teacher_classes > 0
        self.proj = nn.Linear(dim, teacher_dim) if feature_head else None
        if dist_token and self.kd_head is None:
            raise ConfigError("distill.dist_token needs a teacher with logits and a 'kd' or 'hard' loss")

    @property
    def num_features(self) -> int:
        return int(self.backbone.num_features)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        nwd = getattr(self.backbone, "no_weight_decay", lambda: set())()
        return {f"backbone.{n}" for n in nwd}

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, S, S) -> pooled embedding (B, D) and distillation-token embedding (B, D) or None."""
        if self.dist_token:
            t = self.backbone.forward_features(x)  # (B, 2 + N, D): class token, distillation token, patches
            return t[:, 0], t[:, 1]
        return self.backbone(x), None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        emb, dist = self.tokens(x)  # (B, D), (B, D) | None
        out = {"emb": emb, "logits": self.head(emb)}  # (B, C)
        if self.kd_head is not None:
            out["kd_logits"] = self.kd_head(dist if dist is not None else emb)  # (B, Ct)
        elif self.has_kd_logits:
            out["kd_logits"] = out["logits"]  # shared label space: one head for both
        if self.proj is not None:
            out["feat"] = self.proj(emb)  # (B, teacher_dim)
        if dist is not None and self.shared_label_space and not self.training:
            out["logits"] = (out["logits"] + out["kd_logits"]) / 2  # DeiT: average both heads at eval
        return out


def create_student(cfg: StudentConfig, num_classes: int, teacher_dim: int, *, teacher_classes: int = 0,
                   kd_head: bool = True, feature_head: bool = True, dist_token: bool = False, seed: int = 0) -> Student:
    """Build a student for ``num_classes`` task classes distilling from a teacher with ``teacher_dim``
    features and ``teacher_classes`` logits (0: the teacher has no classifier). Same arguments, same
    initial weights."""
    backbone = create_backbone(cfg, dist_token=dist_token, seed=seed)
    size, mean, std = input_spec(backbone, cfg)
    with seeded(seed + 1):
        student = Student(backbone, num_classes, teacher_dim, teacher_classes, img_size=size, mean=mean, std=std,
                          kd_head=kd_head, feature_head=feature_head, dist_token=dist_token)
    student.build_args = {"student": cfg.model_dump(mode="json"), "num_classes": num_classes,
                          "teacher_dim": teacher_dim, "teacher_classes": teacher_classes, "kd_head": kd_head,
                          "feature_head": feature_head, "dist_token": dist_token}
    return student


# --------------------------------------------------------------------------- saved without pickle

ARCHITECTURE_FORMAT = 1


def student_architecture(student: Student) -> dict[str, Any]:
    """What rebuilds ``student`` (weights aside) as plain JSON: the ``create_student`` arguments, its input
    spec, and the shape of a probe head (``distill.head=probe``) if its task head is one."""
    head = student.head
    probe = ({"num_classes": int(head.weight.shape[0]), "dim": int(head.weight.shape[1]),
              "normalize": head.normalize} if isinstance(head, ProbeHead) else None)
    return {"format": ARCHITECTURE_FORMAT, **student.build_args, "img_size": student.img_size,
            "mean": list(student.mean), "std": list(student.std), "probe_head": probe}


def save_student(student: Student, directory: str) -> dict[str, str]:
    """``architecture.json`` and ``weights.safetensors`` in ``directory``; returns their paths by role."""
    import json
    import os

    from safetensors.torch import save_file

    paths = {"architecture": os.path.join(directory, "architecture.json"),
             "weights": os.path.join(directory, "weights.safetensors")}
    with open(paths["architecture"], "w") as f:
        json.dump(student_architecture(student), f, indent=2)
    state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    save_file(state, paths["weights"])
    return paths


def load_student(architecture_path: str, weights_path: str) -> Student:
    """The student :func:`save_student` wrote, in eval mode on the CPU: rebuilt from its JSON (never
    pretrained weights from a hub) and filled from safetensors (no pickle)."""
    import json

    from safetensors.torch import load_file

    with open(architecture_path) as f:
        arch = json.load(f)
    if arch.get("format") != ARCHITECTURE_FORMAT:
        raise ConfigError(f"{architecture_path}: student architecture format {arch.get('format')!r}, expected "
                          f"{ARCHITECTURE_FORMAT}")
    cfg = StudentConfig(**{**arch["student"], "pretrained": False})
    student = create_student(cfg, arch["num_classes"], arch["teacher_dim"], teacher_classes=arch["teacher_classes"],
                             kd_head=arch["kd_head"], feature_head=arch["feature_head"], dist_token=arch["dist_token"])
    if arch["probe_head"]:
        student.head = ProbeHead.of_shape(**arch["probe_head"])
    student.img_size, student.mean, student.std = arch["img_size"], tuple(arch["mean"]), tuple(arch["std"])
    student.load_state_dict(load_file(weights_path))
    return student.eval()
