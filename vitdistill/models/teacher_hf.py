"""Hugging Face transformers vision models as teachers: ``teacher.name: hf:REPO``.

    hf:facebook/dinov2-small                      # AutoModel: Dinov2Model
    hf:openai/clip-vit-base-patch32               # CLIPVisionModelWithProjection (the image tower)
    hf:google/siglip-base-patch16-224             # SiglipVisionModel (the image tower)

Online, the model and its image processor come from the hub. Offline, ``teacher.checkpoint`` is a local
directory written by ``save_pretrained`` (model and image processor: config.json, model.safetensors,
preprocessor_config.json) or a hub snapshot; nothing else is fetched. Preprocessing (size, crop, mean,
std, resampling) is read from the image processor.

The embedding: CLIP's projected ``image_embeds``; DINOv2's class token + patch-token mean of the last
layer (what DINOv2's linear evaluation feeds its probe, 2 x hidden size); otherwise the model's
``pooler_output`` (SigLIP's attention-pooling head, ViT's pooler), else the class token. These are
backbones: no logits. ``teacher.layers`` takes the chosen hidden states after the model's final norm,
each as class token + patch mean (SigLIP, without a class token: the token mean).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitdistill.config import TeacherConfig
from vitdistill.errors import ConfigError
from vitdistill.models.teachers import (TEACHER_SOURCES, Teacher, check_safetensors_in, error_line, pool_block,
                                        shape_mismatch_message, state_dict_sha256, weights_file_in)
from vitdistill.seeding import seeded

# model_type of the checkpoint's config -> the transformers class holding its image tower
VISION_TOWERS = {
    "clip": "CLIPVisionModelWithProjection",
    "clip_vision_model": "CLIPVisionModelWithProjection",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
}
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass
class HFTeacher(Teacher):
    """A transformers vision model; ``model_type`` picks the pooling (see the module docstring)."""

    model_type: str = ""
    num_prefix_tokens: int = 1  # class (+ register) tokens before the patch tokens

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None, list[torch.Tensor] | None]:
        out = self.model(pixel_values=x, output_hidden_states=self.layers is not None)
        tokens = out.last_hidden_state  # (B, T, C)
        if getattr(out, "image_embeds", None) is not None:
            emb = out.image_embeds  # (B, P) CLIP projection
        elif self.model_type.startswith("dinov2"):
            emb = self._pool(tokens)  # (B, 2C)
        elif getattr(out, "pooler_output", None) is not None:
            emb = out.pooler_output  # (B, C)
        else:
            emb = tokens[:, 0]
        if self.layers is None:
            return emb, None, None
        hidden = out.hidden_states[1:]  # the embeddings' output first, then one per block
        from timm.models._features import feature_take_indices

        try:
            take, _ = feature_take_indices(len(hidden), self.layers)
        except (AssertionError, IndexError) as e:
            raise ConfigError(f"teacher.layers={self.layers!r} does not fit {self.name!r} ({len(hidden)} blocks): {e}") from None
        norm = _final_norm(self.model)
        return emb, None, [self._pool(norm(hidden[i])) for i in take]

    def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, 2C) class token + patch mean, or (B, C) token mean without a class token."""
        p = self.num_prefix_tokens
        return pool_block(tokens[:, p:], tokens[:, :p] if p else None)


def _final_norm(model: nn.Module) -> nn.Module:
    for owner in (model, getattr(model, "vision_model", None)):
        for attr in ("layernorm", "post_layernorm"):
            if owner is not None and isinstance(getattr(owner, attr, None), nn.Module):
                return getattr(owner, attr)
    return nn.Identity()


def _get(d: Any, key: str) -> Any:
    return d.get(key) if isinstance(d, dict) else getattr(d, key, None)


def processor_data_config(proc: Any) -> dict[str, Any]:
    """A transformers image processor -> timm's data config (input_size, crop_pct, crop_mode, ...).

    Resize the shorter side then centre-crop (DINOv2, CLIP) becomes ``crop_pct = crop / resize``;
    resize to a fixed height x width without a crop (SigLIP) becomes ``crop_mode="squash"``.
    """
    size, crop = proc.size, getattr(proc, "crop_size", None)
    if getattr(proc, "do_center_crop", False) and crop is not None:
        h, w = int(_get(crop, "height")), int(_get(crop, "width"))
        short = _get(size, "shortest_edge") or min(_get(size, "height"), _get(size, "width"))
        crop_pct, mode = h / float(short), "center"
    else:
        h = int(_get(size, "height") or _get(size, "shortest_edge"))
        w = int(_get(size, "width") or h)
        crop_pct, mode = 1.0, "squash"
    resample = getattr(proc, "resample", 3)
    return {
        "input_size": [3, h, w],
        "interpolation": _RESAMPLE.get(int(resample) if resample is not None else 3, "bicubic"),
        "mean": [float(v) for v in proc.image_mean],
        "std": [float(v) for v in proc.image_std],
        "crop_pct": crop_pct,
        "crop_mode": mode,
    }


@TEACHER_SOURCES.register("hf")
def hf_teacher(model_id: str, cfg: TeacherConfig) -> Teacher:
    """transformers vision backbone or CLIP/SigLIP image tower (hf:REPO); offline: teacher.checkpoint = its save_pretrained dir."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor

    local = cfg.checkpoint is not None
    if local and not os.path.isdir(cfg.checkpoint):
        raise ConfigError(f"teacher.checkpoint {cfg.checkpoint!r}: an hf: teacher needs a save_pretrained directory "
                          "(config.json, model.safetensors, preprocessor_config.json), not a file")
    src = cfg.checkpoint or model_id
    offline = ("set teacher.checkpoint to a local save_pretrained directory of the model and its image processor "
               "(config.json, model.safetensors, preprocessor_config.json)")
    try:
        config = AutoConfig.from_pretrained(src, local_files_only=local)
        proc = AutoImageProcessor.from_pretrained(src, local_files_only=local)
    except Exception as e:  # OSError offline, ValueError for an unknown model type, ...
        where = f"teacher.checkpoint {cfg.checkpoint!r}" if local else f"teacher {cfg.name!r}"
        hint = "check the directory" if local else f"offline, {offline}"
        raise ConfigError(f"{where}: model config or image processor could not be loaded ({error_line(e)}); {hint}") from None
    cls = getattr(transformers, VISION_TOWERS.get(config.model_type, "AutoModel"))
    if local:
        check_safetensors_in(cfg.checkpoint)  # transformers would not name a garbage weights file
    mismatched: list = []
    with seeded(0):
        try:
            if cfg.pretrained or local:  # mismatched shapes are reported, then refused below, naming the first
                model, info = cls.from_pretrained(src, local_files_only=local, ignore_mismatched_sizes=True,
                                                  output_loading_info=True)
                mismatched = list(info.get("mismatched_keys") or [])
            else:  # random init of the same architecture (a baseline)
                vision = getattr(config, "vision_config", config) if config.model_type in VISION_TOWERS else config
                model = cls.from_config(vision) if cls is transformers.AutoModel else cls(vision)
        except Exception as e:
            raise ConfigError(f"teacher {cfg.name!r}: weights could not be loaded ({error_line(e)}); offline, {offline}") from None
    if mismatched:
        order = {k: i for i, k in enumerate(model.state_dict())}
        mismatched.sort(key=lambda m: order.get(m[0], len(order)))
        weights = weights_file_in(cfg.checkpoint, ("model.safetensors", "pytorch_model.bin")) if local else src
        raise ConfigError(shape_mismatch_message("teacher.checkpoint" if local else "teacher", weights,
                                                 f"hf {type(model).__name__} (its config.json)",
                                                 [(k, tuple(want), tuple(got)) for k, got, want in mismatched]))
    vcfg = getattr(model.config, "vision_config", model.config)
    no_cls = config.model_type.startswith("siglip")
    return HFTeacher(
        name=cfg.name,
        architecture=f"hf:{type(model).__name__}",
        model=model,
        data_config=processor_data_config(proc),
        weights_sha256=state_dict_sha256(model.state_dict()),
        source="hf",
        model_type=config.model_type,
        num_prefix_tokens=0 if no_cls else 1 + int(getattr(vcfg, "num_register_tokens", 0) or 0),
    )
