"""open_clip models: the image tower as a teacher, ``teacher.name: open_clip:MODEL/PRETRAINED``.

    open_clip:ViT-B-32/laion2b_s34b_b79k          # MODEL and PRETRAINED tag as open_clip.list_pretrained() lists them
    open_clip:hf-hub:timm/ViT-B-16-SigLIP         # a hub repo holding open_clip_config.json and weights
    open_clip:local-dir:/models/my-clip           # the same layout in a local directory (offline)
    open_clip:ViT-B-32                            # no tag: random init, or teacher.checkpoint

Online, PRETRAINED weights are downloaded by open_clip. Offline, ``teacher.checkpoint`` is a local
checkpoint file of that MODEL (``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin`` from its
hub repo, or a state dict saved with ``torch.save``), loaded weights-only. Preprocessing comes from the
model's ``preprocess_cfg``. The embedding is ``encode_image`` (projected, unnormalised); no logits.
The same loader builds the LiT text tower ``lit.text_tower: open_clip:MODEL/PRETRAINED``
(:mod:`vitdistill.lit.text`).
"""

from __future__ import annotations

import difflib
import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitdistill.config import TeacherConfig
from vitdistill.errors import ConfigError, RegistryError
from vitdistill.seeding import seeded
from vitdistill.models.teachers import (TEACHER_SOURCES, Teacher, check_safetensors_in, error_line,
                                        load_checkpoint_into, loader_mismatch, pool_block, state_dict_sha256)

_CROP_MODES = {"shortest": "center", "squash": "squash", "longest": "border"}


def split_open_clip_name(spec: str) -> tuple[str, str | None]:
    """``"ViT-B-32/openai"`` -> ``("ViT-B-32", "openai")``; ``hf-hub:``/``local-dir:`` names stay whole."""
    if spec.startswith(("hf-hub:", "local-dir:")):
        return spec, None
    model, _, tag = spec.partition("/")
    return model, tag or None


def load_open_clip(spec: str, checkpoint: str | None, pretrained: bool, key: str) -> nn.Module:
    """An open_clip model from ``MODEL/PRETRAINED`` (hub) or ``MODEL`` + a local ``checkpoint`` file.

    ``key`` is the config key that holds ``checkpoint`` (named in errors: ``teacher.checkpoint``).
    """
    import open_clip

    model_name, tag = split_open_clip_name(spec)
    if not model_name.startswith(("hf-hub:", "local-dir:")) and model_name not in open_clip.list_models():
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3)
        raise RegistryError(f"unknown open_clip model {model_name!r}" + (f" (close: {', '.join(close)})" if close else "")
                            + f"; write open_clip:MODEL/PRETRAINED with MODEL from open_clip.list_models() "
                            f"({len(open_clip.list_models())} known)")
    with seeded(0):  # random init is reproducible
        hub = pretrained and checkpoint is None
        local_dir = model_name.removeprefix("local-dir:") if model_name.startswith("local-dir:") else None
        if local_dir and hub and os.path.isdir(local_dir):
            check_safetensors_in(local_dir, key="open_clip local-dir")
        try:
            if model_name.startswith(("hf-hub:", "local-dir:")):
                model = open_clip.create_model(model_name, load_weights=hub)
            else:
                model = open_clip.create_model(model_name, pretrained=tag if hub else None)
        except Exception as e:  # download failures come in many types
            mismatch = local_dir and loader_mismatch(  # open_clip's own loader: weights that do not fit its config
                e, "open_clip local-dir", local_dir, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
                "the model of its open_clip_config.json")
            if mismatch:
                raise mismatch from None
            raise ConfigError(
                f"open_clip {spec!r}: could not be loaded ({error_line(e)}); "
                f"offline, set {key} to a local checkpoint file of {model_name} (open_clip_model.safetensors from its "
                f"hub repo, or a torch.save'd state dict) or use open_clip:local-dir:DIR"
            ) from None
    if checkpoint:
        load_checkpoint_into(model, checkpoint, f"open_clip {model_name!r}", key=key)
    return model.eval()


def open_clip_data_config(visual: nn.Module) -> dict[str, Any]:
    """open_clip's ``preprocess_cfg`` -> timm's data config (shortest-side resize + centre crop is crop_pct 1)."""
    from open_clip.model import get_model_preprocess_cfg

    pp = get_model_preprocess_cfg(visual)
    size = pp["size"]
    h, w = (size, size) if isinstance(size, int) else size
    return {
        "input_size": [3, int(h), int(w)],
        "interpolation": pp.get("interpolation", "bicubic"),
        "mean": [float(v) for v in pp["mean"]],
        "std": [float(v) for v in pp["std"]],
        "crop_pct": 1.0,
        "crop_mode": _CROP_MODES.get(pp.get("resize_mode", "shortest"), "center"),
    }


@dataclass
class OpenClipTeacher(Teacher):
    """open_clip's image tower (``model`` is ``clip.visual``)."""

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None, list[torch.Tensor] | None]:
        if self.layers is None:
            return self.model(x), None, None  # (B, embed_dim)
        fn = getattr(self.model, "forward_intermediates", None)
        if fn is None:
            raise ConfigError(f"teacher {self.name!r}: this open_clip image tower has no forward_intermediates; "
                              "unset teacher.layers")
        wanted = {"indices": self.layers, "normalize_intermediates": True, "output_fmt": "NCHW",
                  "output_extra_tokens": True}
        params = inspect.signature(fn).parameters
        try:
            out = fn(x, **{k: v for k, v in wanted.items() if k in params})
        except (AssertionError, IndexError) as e:
            raise ConfigError(f"teacher.layers={self.layers!r} does not fit teacher {self.name!r}: {e}") from None
        prefix = out.get("image_intermediates_prefix") or [None] * len(out["image_intermediates"])
        return out["image_features"], None, [pool_block(b, p) for b, p in zip(out["image_intermediates"], prefix)]


@TEACHER_SOURCES.register("open_clip")
def open_clip_teacher(model_id: str, cfg: TeacherConfig) -> Teacher:
    """Image tower of open_clip:MODEL/PRETRAINED; offline: teacher.checkpoint = the model's checkpoint file."""
    clip = load_open_clip(model_id, cfg.checkpoint, cfg.pretrained, "teacher.checkpoint")
    visual = clip.visual
    return OpenClipTeacher(
        name=cfg.name,
        architecture=f"open_clip:{split_open_clip_name(model_id)[0]}",
        model=visual,
        data_config=open_clip_data_config(visual),
        weights_sha256=state_dict_sha256(visual.state_dict()),
        source="open_clip",
    )
