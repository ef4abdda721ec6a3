"""LiT training: locked image embeddings from the cache and a trained text side, through the shared trainer.

    history = train_lit(model, loss_fn, data, cfg, frozen_text=True, on_epoch=print)

LiT trains with :class:`vitdistill.trainer.Trainer`, the loop distillation uses (schedule, timm
optimiser, parameter groups, clipping, the non-finite loss stop, callbacks): what is LiT's own is
the batch source (:class:`LitBatches`), the module the trainer trains (:class:`LitObjective`: the
model and the loss's temperature, batch -> loss dict), the parameter groups (heads at ``lr``, a
pretrained tower being fine-tuned at ``text_lr``, the temperature at ``temperature_lr``) and the
validation callback. The history holds one dict per epoch (``epoch`` from 0, ``train_loss``,
``val_loss``, ``temperature``, ``lr``, ``seconds``, plus ``bias`` for the sigmoid loss), each passed
to ``on_epoch``; the loop knows nothing of MLflow.

Each batch pairs B images with their captions; the distinct captions of the batch (M <= B) are
encoded once and a (B, M) positive mask tells the loss which pairs match: an image and a text
match when the text is in the same group as the image's caption (identical text, or for generated
captions any prompt of the same class; see :mod:`vitdistill.lit.data` and
:mod:`vitdistill.lit.losses`). A frozen pretrained tower is run once over every distinct text
before training, so an epoch costs only the heads.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from vitdistill.config import LitConfig
from vitdistill.lit.data import LitData, LitSplit
from vitdistill.lit.model import LitModel
from vitdistill.logs import EpochLog
from vitdistill.trainer import Batch, Callback, Trainer, TrainerConfig

log = logging.getLogger(__name__)

ENCODE_BATCH = 256  # texts per tower forward pass outside training


class TextFeatures:
    """Pooled tower features for text ids: a precomputed table when the tower is frozen, else live."""

    def __init__(self, model: LitModel, texts: list[str], frozen: bool) -> None:
        self.model, self.texts = model, texts
        self.table: torch.Tensor | None = None
        if frozen:
            model.text_tower.requires_grad_(False).eval()
            with torch.no_grad():
                self.table = torch.cat([model.text_tower(texts[i:i + ENCODE_BATCH])
                                        for i in range(0, len(texts), ENCODE_BATCH)])  # (U, F)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """(M,) text ids -> (M, F) pooled features."""
        if self.table is not None:
            return self.table[ids]
        return self.model.text_tower([self.texts[i] for i in ids.tolist()])


def positives_for(text_ids: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct texts of a batch and who matches whom: (B,) ids, (U,) groups -> (M,) distinct ids, (B, M) bool."""
    distinct = torch.unique(text_ids)  # (M,) sorted
    return distinct, groups[text_ids][:, None] == groups[distinct][None, :]


def batch_loss(model: LitModel, loss_fn: nn.Module, feats: TextFeatures, emb: torch.Tensor,
               text_ids: torch.Tensor, groups: torch.Tensor) -> dict[str, torch.Tensor]:
    """One contrastive batch: emb (B, D) locked image embeddings, text_ids (B,), groups (U,) -> the loss dict."""
    distinct, positives = positives_for(text_ids, groups)
    img = model.encode_image(emb)  # (B, E)
    txt = model.project_text(feats(distinct))  # (M, E)
    return loss_fn(img, txt, positives)


def trainer_config(cfg: LitConfig, progress: bool = False) -> TrainerConfig:
    return TrainerConfig(epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
                         warmup_fraction=cfg.warmup_fraction, grad_clip=cfg.grad_clip, optimizer=cfg.optimizer,
                         progress=progress, name="lit")


def lit_parts(objective: LitObjective, cfg: LitConfig) -> list[tuple[nn.Module, float]]:
    """The trainer's ``(module, peak lr)`` pairs: heads at lr, the loss's temperature (and bias) at
    temperature_lr, a tower being trained at text_lr if pretrained, else lr."""
    model = objective.model
    parts = [(model.text_head, cfg.lr), (model.image_head, cfg.lr), (objective.loss_fn, cfg.temperature_lr)]
    if not objective.frozen_text:
        parts.append((model.text_tower, cfg.text_lr if model.text_tower.pretrained else cfg.lr))
    return parts


def _batches(n: int, batch_size: int, order: torch.Tensor) -> list[torch.Tensor]:
    """``order`` cut into ceil(n / batch_size) near-equal batches (no tiny last batch)."""
    return list(torch.tensor_split(order, max(1, math.ceil(n / batch_size))))


@torch.no_grad()
def split_loss(model: LitModel, loss_fn: nn.Module, feats: TextFeatures, split: LitSplit, groups: torch.Tensor,
               batch_size: int) -> dict[str, float]:
    """Mean loss dict over a split in fixed order with fixed captions (sample-weighted)."""
    model.eval()
    ids = torch.from_numpy(split.fixed_text_ids())
    sums: dict[str, float] = defaultdict(float)
    for idx in _batches(len(split), batch_size, torch.arange(len(split))):
        emb = torch.from_numpy(split.embeddings(idx.numpy()))  # (B, D)
        for k, v in batch_loss(model, loss_fn, feats, emb, ids[idx], groups).items():
            sums[k] += float(v) * len(idx)
    return {k: v / len(split) for k, v in sums.items()}


class LitObjective(nn.Module):
    """What the trainer trains for LiT: the model and the loss module (its temperature), batch -> loss dict.

    A batch is ``input`` (B, D) locked image embeddings and ``text_ids`` (B,) one caption each.
    """

    def __init__(self, model: LitModel, loss_fn: nn.Module, feats: TextFeatures, groups: torch.Tensor,
                 frozen_text: bool) -> None:
        super().__init__()
        self.model, self.loss_fn, self.feats, self.frozen_text = model, loss_fn, feats, frozen_text
        self.register_buffer("groups", groups, persistent=False)  # (U,) text id -> group

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return batch_loss(self.model, self.loss_fn, self.feats, batch["input"], batch["text_ids"], self.groups)

    def train(self, mode: bool = True) -> LitObjective:
        super().train(mode)
        if self.frozen_text:
            self.model.text_tower.eval()
        return self


class LitBatches:
    """The trainer's batch source: epoch e is a permutation of train and one caption per image, both drawn
    from a generator seeded by (seed, e), so a batch is a function of (epoch, position)."""

    def __init__(self, split: LitSplit, batch_size: int, seed: int) -> None:
        self.split, self.options = split, torch.from_numpy(split.options)  # (N, K)
        self.batch_size, self.seed = batch_size, seed

    def __len__(self) -> int:
        return max(1, math.ceil(len(self.split) / self.batch_size))

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        n, k = self.options.shape
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
        order = torch.randperm(n, generator=gen)
        text_ids = self.options[torch.arange(n), torch.randint(k, (n,), generator=gen)]  # (N,) one caption each
        for idx in _batches(n, self.batch_size, order)[start:]:
            yield {"input": torch.from_numpy(self.split.embeddings(idx.numpy())), "text_ids": text_ids[idx]}


class LitValidation(Callback):
    """Turns the trainer's epoch summary into LiT's history row: ``train_loss``, val loss, the temperature now."""

    def __init__(self, objective: LitObjective, data: LitData, batch_size: int) -> None:
        self.objective, self.data, self.batch_size = objective, data, batch_size

    def on_epoch(self, trainer: Trainer, epoch: int, summary: dict[str, float]) -> None:
        o = self.objective
        val = split_loss(o.model, o.loss_fn, o.feats, self.data.val, o.groups, self.batch_size) \
            if len(self.data.val) > 1 else {}
        summary["train_loss"] = summary.pop("loss")
        for key in ("contrastive_loss", "temperature", "bias"):  # step means; the values now follow
            summary.pop(key, None)
        summary.update(val_loss=val.get("loss", float("nan")), temperature=float(o.loss_fn.temperature().detach()))
        if hasattr(o.loss_fn, "bias"):
            summary["bias"] = float(o.loss_fn.bias.detach())


class OnEpoch(Callback):
    """Passes a copy of each epoch's row to a plain function."""

    def __init__(self, fn: Callable[[dict], None]) -> None:
        self.fn = fn

    def on_epoch(self, trainer: Trainer, epoch: int, summary: dict[str, float]) -> None:
        self.fn(dict(summary))


def train_lit(model: LitModel, loss_fn: nn.Module, data: LitData, cfg: LitConfig, *, frozen_text: bool,
              feats: TextFeatures | None = None, progress: bool = True,
              on_epoch: Callable[[dict], None] | None = None, callbacks: Sequence[Callback] = ()) -> list[dict]:
    """Train ``model`` (text side and heads) and ``loss_fn`` (temperature) in place; returns history.
    ``callbacks`` run after the validation callback, so their ``on_epoch`` sees the whole history row."""
    feats = feats or TextFeatures(model, data.texts, frozen_text)
    objective = LitObjective(model, loss_fn, feats, torch.from_numpy(data.text_groups), frozen_text)
    callbacks = [LitValidation(objective, data, cfg.batch_size), EpochLog("lit"),
                 *([OnEpoch(on_epoch)] if on_epoch else []), *callbacks]
    batches = LitBatches(data.train, cfg.batch_size, cfg.seed)
    log.info("LiT: %d epochs of %d batches, %s text tower", cfg.epochs, len(batches),
             "frozen" if frozen_text else "trained")
    trainer = Trainer(objective, None, batches, trainer_config(cfg, progress), callbacks,
                      parts=lit_parts(objective, cfg))
    return trainer.fit().history


@torch.no_grad()
def embed_text_ids(model: LitModel, feats: TextFeatures, ids: np.ndarray) -> np.ndarray:
    """Joint-space text embeddings for text ids: (...,) -> (..., E) float32 unit vectors."""
    model.eval()
    flat = torch.from_numpy(np.asarray(ids, dtype=np.int64).reshape(-1))
    out = [model.project_text(feats(flat[i:i + ENCODE_BATCH])) for i in range(0, len(flat), ENCODE_BATCH)]
    return torch.cat(out).numpy().reshape(*np.shape(ids), -1)


@torch.no_grad()
def embed_images(model: LitModel, split: LitSplit, idx: np.ndarray | None = None) -> np.ndarray:
    """Joint-space image embeddings of a split's samples ``idx`` (all when None): (n, E) float32 unit vectors."""
    model.eval()
    return model.encode_image(torch.from_numpy(split.embeddings(idx))).numpy()
