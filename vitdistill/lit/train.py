"""The LiT training loop: locked image embeddings from the cache, a trained text side, callbacks.

    history = train_lit(model, loss_fn, data, cfg, frozen_text=True, on_epoch=print)

The loop knows nothing of MLflow: it returns one dict per epoch (``epoch, train_loss, val_loss,
temperature, lr, seconds``, plus ``bias`` for the sigmoid loss) and passes each to ``on_epoch``.

Each batch pairs B images with their captions; the distinct captions of the batch (M <= B) are
encoded once and a (B, M) positive mask tells the loss which pairs match: an image and a text
match when the text is in the same group as the image's caption (identical text, or for generated
captions any prompt of the same class; see :mod:`vitdistill.lit.data` and
:mod:`vitdistill.lit.losses`). A frozen pretrained tower is run once over every distinct text
before training, so an epoch costs only the heads.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Callable

import numpy as np
import torch
from torch import nn

from vitdistill.config import LitConfig
from vitdistill.errors import TrainingError
from vitdistill.lit.data import LitData, LitSplit
from vitdistill.lit.model import LitModel
from vitdistill.progress import progress_bar

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


def check_finite(losses: dict[str, torch.Tensor], step: int, epoch: int) -> None:
    """Stop on a NaN or infinite loss, naming the step: training on would only log NaNs."""
    loss = float(losses["loss"].detach())
    if not math.isfinite(loss):
        terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items() if k != "loss")
        raise TrainingError(f"LiT step {step} (epoch {epoch}): loss is {loss}{f' ({terms})' if terms else ''}; "
                            "lower lit.lr or lit.temperature_lr, or check the cached embeddings")


def warmup_cosine(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """LR multiplier: linear from ~0 to 1 over the warm-up steps, then cosine down to 0."""
    warmup = int(round(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(model: LitModel, loss_fn: nn.Module, cfg: LitConfig, frozen_text: bool) -> torch.optim.AdamW:
    """AdamW; weight matrices decay, biases/norms/temperature do not; the loss's parameters get
    temperature_lr and a pretrained tower text_lr."""
    tower_lr = cfg.text_lr if model.text_tower.pretrained else cfg.lr
    parts = [(model.text_head, cfg.lr), (model.image_head, cfg.lr), (loss_fn, cfg.temperature_lr)]
    if not frozen_text:
        parts.append((model.text_tower, tower_lr))
    groups = []
    for module, lr in parts:
        params = [p for p in module.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2 and module is not loss_fn]
        rest = [p for p in params if not (p.ndim >= 2 and module is not loss_fn)]
        for g, wd in ((decay, cfg.weight_decay), (rest, 0.0)):
            if g:
                groups.append({"params": g, "lr": lr, "weight_decay": wd})
    return torch.optim.AdamW(groups)


def _batches(n: int, batch_size: int, order: torch.Tensor) -> list[torch.Tensor]:
    """``order`` cut into ceil(n / batch_size) near-equal batches (no tiny last batch)."""
    return list(torch.tensor_split(order, max(1, math.ceil(n / batch_size))))


@torch.no_grad()
def split_loss(model: LitModel, loss_fn: nn.Module, feats: TextFeatures, split: LitSplit, groups: torch.Tensor,
               batch_size: int) -> dict[str, float]:
    """Mean loss dict over a split in fixed order with fixed captions (sample-weighted)."""
    model.eval()
    emb, ids = torch.from_numpy(split.emb), torch.from_numpy(split.fixed_text_ids())
    sums: dict[str, float] = defaultdict(float)
    for idx in _batches(len(split), batch_size, torch.arange(len(split))):
        for k, v in batch_loss(model, loss_fn, feats, emb[idx], ids[idx], groups).items():
            sums[k] += float(v) * len(idx)
    return {k: v / len(split) for k, v in sums.items()}


def train_lit(model: LitModel, loss_fn: nn.Module, data: LitData, cfg: LitConfig, *, frozen_text: bool,
              feats: TextFeatures | None = None, progress: bool = True,
              on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """Train ``model`` (text side and heads) and ``loss_fn`` (temperature) in place; returns history."""
    feats = feats or TextFeatures(model, data.texts, frozen_text)
    gen = torch.Generator().manual_seed(cfg.seed)
    emb, options = torch.from_numpy(data.train.emb), torch.from_numpy(data.train.options)  # (N, D), (N, K)
    groups = torch.from_numpy(data.text_groups)  # (U,)
    n, k = options.shape
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    opt = make_optimizer(model, loss_fn, cfg, frozen_text)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.epochs * steps_per_epoch, cfg.warmup_fraction))
    history: list[dict] = []
    bar = progress_bar(progress, total=cfg.epochs * steps_per_epoch, desc="lit", unit="step", leave=False)
    try:
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            if frozen_text:
                model.text_tower.eval()
            order = torch.randperm(n, generator=gen)
            text_ids = options[torch.arange(n), torch.randint(k, (n,), generator=gen)]  # (N,) one caption each
            sums: dict[str, float] = defaultdict(float)
            for idx in _batches(n, cfg.batch_size, order):
                out = batch_loss(model, loss_fn, feats, emb[idx], text_ids[idx], groups)
                check_finite(out, step=sched.last_epoch + 1, epoch=epoch)
                opt.zero_grad(set_to_none=True)
                out["loss"].backward()
                opt.step()
                sched.step()
                for name, v in out.items():
                    sums[name] += float(v.detach()) * len(idx)
                bar.update()
            val = split_loss(model, loss_fn, feats, data.val, groups, cfg.batch_size) if len(data.val) > 1 else {}
            row = {"epoch": epoch, "train_loss": sums["loss"] / n, "val_loss": val.get("loss", float("nan")),
                   "temperature": float(loss_fn.temperature().detach())}
            if hasattr(loss_fn, "bias"):
                row["bias"] = float(loss_fn.bias.detach())
            row["lr"] = float(sched.get_last_lr()[0])
            row["seconds"] = time.perf_counter() - t0
            history.append(row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", t=f"{row['temperature']:.1f}")
            if on_epoch is not None:
                on_epoch(dict(row))
    finally:
        bar.close()
    model.eval()
    return history


@torch.no_grad()
def embed_text_ids(model: LitModel, feats: TextFeatures, ids: np.ndarray) -> np.ndarray:
    """Joint-space text embeddings for text ids: (...,) -> (..., E) float32 unit vectors."""
    model.eval()
    flat = torch.from_numpy(np.asarray(ids, dtype=np.int64).reshape(-1))
    out = [model.project_text(feats(flat[i:i + ENCODE_BATCH])) for i in range(0, len(flat), ENCODE_BATCH)]
    return torch.cat(out).numpy().reshape(*np.shape(ids), -1)


@torch.no_grad()
def embed_images(model: LitModel, emb: np.ndarray) -> np.ndarray:
    """Joint-space image embeddings: (N, D) locked embeddings -> (N, E) float32 unit vectors."""
    model.eval()
    return model.encode_image(torch.from_numpy(emb)).numpy()
