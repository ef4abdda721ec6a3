"""The trained side of LiT: a text tower and two projection heads into one joint space.

    model = LitModel(create_text_tower("minilm"), image_dim=1280, embed_dim=128)
    txt = model(["a photo of a circle."])       # (1, 128), unit norm
    img = model.encode_image(cached_emb)        # (N, 128), unit norm; the image tower stays locked

The module is self-contained (tokenizer included). Log it with
``mlflow.pytorch.log_model(model, name="lit", serialization_format="pickle")``: MLflow 3 defaults
to ``pt2``, which traces ``forward`` on tensor inputs and cannot take a list of strings.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitdistill.errors import ConfigError
from vitdistill.lit.text import TextTower


def make_head(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """``linear``: one projection; ``mlp``: Linear-GELU-Linear with a hidden layer of ``max(in, out)``;
    ``identity``: no head (needs in_dim == out_dim)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        hidden = max(in_dim, out_dim)
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
    if kind == "identity":
        if in_dim != out_dim:
            raise ConfigError(f"identity head needs equal dims, got {in_dim} -> {out_dim}")
        return nn.Identity()
    raise ConfigError(f"unknown head {kind!r}; valid heads: identity, linear, mlp")


class LitModel(nn.Module):
    def __init__(self, tower: TextTower, image_dim: int, embed_dim: int, text_head: str = "mlp",
                 image_head: str = "linear") -> None:
        super().__init__()
        self.embed_dim = image_dim if image_head == "identity" else embed_dim
        self.text_tower = tower
        self.text_head = make_head(text_head, tower.dim, self.embed_dim)
        self.image_head = make_head(image_head, image_dim, self.embed_dim)

    def project_text(self, feats: torch.Tensor) -> torch.Tensor:
        """Pooled tower features (B, tower.dim) -> (B, E) unit vectors."""
        return F.normalize(self.text_head(feats), dim=-1)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings -> (B, E) unit vectors in the joint space."""
        return self.project_text(self.text_tower(list(texts)))

    def encode_image(self, emb: torch.Tensor) -> torch.Tensor:
        """Locked image embeddings (B, D) -> (B, E) unit vectors in the joint space."""
        return F.normalize(self.image_head(emb), dim=-1)

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode_text(texts)
