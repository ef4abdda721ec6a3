"""The LiT stage: locked-image text tuning on one feature cache, with what to log and show.

    report = run_lit("vitdistill-cache/features/effnet_lite0_imagenet-...", LitConfig(), on_epoch=log_step)
    report.metrics["zeroshot_top1"], report.history, report.figures["lit_loss.png"], report.model

The image tower is locked: its embeddings are read from the cache and never recomputed. The text
tower (or, frozen, only its head), the image projection head and the temperature are trained on
train (with the shapes hold-out applied, see :mod:`vitdistill.lit.data`); val gives a loss curve;
test is read once for zero-shot classification and retrieval.

The cache's embeddings are memory-mapped from a temporary spill (float16, under $TMPDIR) for the
length of the run, batches are gathered from it, and the test split is embedded and scored in chunks
of ``EVAL_CHUNK`` (retrieval never holds the (N, U) similarity matrix), so memory stays flat as the
cache grows.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from torch import nn

from vitdistill.config import LitConfig, TrackingConfig
from vitdistill.lit.data import LitData, load_lit_data
from vitdistill.lit.evaluate import recall_at_k_chunks, zeroshot_classifier, zeroshot_predict
from vitdistill.lit.losses import create_lit_loss
from vitdistill.lit.model import LitModel
from vitdistill.lit.plots import loss_curve_figure
from vitdistill.lit.text import create_text_tower
from vitdistill.lit.train import TextFeatures, embed_images, embed_text_ids, train_lit
from vitdistill.live import live_callbacks
from vitdistill.probes.metrics import confusion_matrix, mean_per_class_recall
from vitdistill.probes.plots import confusion_figure, per_class_table
from vitdistill.seeding import seeded
from vitdistill.tracking import cache_lineage

RETRIEVAL_KS = (1, 5, 10)
EVAL_CHUNK = 8192  # test images embedded and scored at a time


@dataclass
class LitReport:
    metrics: dict[str, float]
    history: list[dict]  # a row per epoch (from 0): epoch, train_loss, val_loss, temperature, lr, seconds
    tables: dict[str, list[dict[str, Any]]]
    figures: dict[str, Any] = field(default_factory=dict)  # artifact name -> matplotlib Figure
    model: nn.Module | None = None  # LitModel: strings -> joint space, plus the image head
    split_sizes: dict[str, int] = field(default_factory=dict)
    headline: str = ""
    curves_logged: bool = False  # the history went to the MLflow run live, during training


def build_lit_model(cfg: LitConfig, data: LitData) -> tuple[LitModel, nn.Module]:
    """The text tower (scratch vocab from train captions and prompts), heads and loss, seeded."""
    with seeded(cfg.seed):  # one seeded construction at a time (stages may run in threads at once)
        train_texts = {data.texts[i] for i in np.unique(data.train.options)}
        prompts = {data.texts[i] for i in np.unique(data.prompt_ids)} if data.prompt_ids is not None else set()
        corpus = sorted(train_texts | prompts)
        tower = create_text_tower(cfg.text_tower, corpus=corpus, max_length=cfg.max_text_length,
                                  width=cfg.scratch_width, layers=cfg.scratch_layers, heads=cfg.scratch_heads,
                                  checkpoint=cfg.text_checkpoint)
        model = LitModel(tower, image_dim=data.train.dim, embed_dim=cfg.embed_dim,
                         text_head=cfg.text_head, image_head=cfg.image_head)
        loss_fn = create_lit_loss(cfg.loss, init_temperature=cfg.init_temperature, init_bias=cfg.init_bias)
    return model, loss_fn


def zeroshot_metrics(pred: np.ndarray, cls: np.ndarray, c: int,
                     heldout: np.ndarray | None) -> tuple[dict[str, float], np.ndarray]:
    """pred (N,) zero-shot classes, cls (N,), c classes, heldout (N,) bool or None -> metrics, (C, C) confusion."""
    cm = confusion_matrix(cls, pred, c)
    out = {"zeroshot_top1": float(np.mean(pred == cls)), "zeroshot_mean_per_class_recall": mean_per_class_recall(cm),
           "chance_top1": 1.0 / c}
    if heldout is not None and heldout.any():
        out["heldout_zeroshot_top1"] = float(np.mean(pred[heldout] == cls[heldout]))
        seen = ~heldout
        out["seen_zeroshot_top1"] = float(np.mean(pred[seen] == cls[seen])) if seen.any() else float("nan")
    return out, cm


def run_lit(cache_dir: str, cfg: LitConfig, *, progress: bool = True,
            on_epoch: Callable[[dict], None] | None = None, run_id: str | None = None,
            tracking: TrackingConfig | None = None) -> LitReport:
    """Train and evaluate LiT on ``cache_dir``. With ``run_id`` and ``tracking``, the training is logged
    to that MLflow run as it goes (:func:`vitdistill.live.live_callbacks`)."""
    with tempfile.TemporaryDirectory(prefix="vitdistill-lit-") as spill:  # the embeddings, memory-mapped
        data = load_lit_data(cache_dir, holdout_combos=cfg.holdout_combos, spill_dir=spill)
        return _train_and_evaluate(data, cfg, progress=progress, on_epoch=on_epoch, run_id=run_id, tracking=tracking)


def _train_and_evaluate(data: LitData, cfg: LitConfig, *, progress: bool, on_epoch: Callable[[dict], None] | None,
                        run_id: str | None, tracking: TrackingConfig | None) -> LitReport:
    model, loss_fn = build_lit_model(cfg, data)
    frozen = model.text_tower.pretrained and cfg.freeze_text
    t0 = time.perf_counter()
    feats = TextFeatures(model, data.texts, frozen)
    live = live_callbacks(tracking, run_id) if tracking is not None else []
    history = train_lit(model, loss_fn, data, cfg, frozen_text=frozen, feats=feats, progress=progress,
                        on_epoch=on_epoch, callbacks=live)
    train_seconds = time.perf_counter() - t0

    test = data.test
    text_ids = test.fixed_text_ids()  # (N,)
    distinct, text_of_image = np.unique(text_ids, return_inverse=True)
    parts = [np.arange(a, min(a + EVAL_CHUNK, len(test))) for a in range(0, len(test), EVAL_CHUNK)]

    def image_chunks():  # the test images in the joint space, chunk by chunk: (n, E), their caption ids (n,)
        return ((embed_images(model, test, idx), text_of_image[idx]) for idx in parts)

    retrieval = recall_at_k_chunks(image_chunks, embed_text_ids(model, feats, distinct), RETRIEVAL_KS)
    metrics: dict[str, float] = {f"retrieval_{k}": v for k, v in retrieval.items()}
    metrics["retrieval_texts"] = float(len(distinct))
    last = history[-1]
    metrics.update({"train_loss": last["train_loss"], "val_loss": last["val_loss"],
                    "temperature": last["temperature"], "train_seconds": train_seconds})
    if "bias" in last:
        metrics["bias"] = last["bias"]
    if not data.captions_generated:  # the cache has captions: say how many samples had none
        metrics["captions_missing"] = float(data.captions_missing)
        metrics["captions_missing_dropped"] = float(data.captions_missing_dropped)

    tables: dict[str, list[dict[str, Any]]] = {"history": [dict(r) for r in history]}
    kind = f"{cfg.text_tower}{' (frozen)' if frozen else ''}, {cfg.loss}"
    figures = {"lit_loss.png": loss_curve_figure(history, f"LiT {kind}")}
    headline = f"LiT {kind}:"
    if data.classes is not None and test.cls is not None:
        classifier = zeroshot_classifier(embed_text_ids(model, feats, data.prompt_ids))  # (C, E)
        pred = np.concatenate([zeroshot_predict(img, classifier) for img, _ in image_chunks()])  # (N,)
        zs, cm = zeroshot_metrics(pred, test.cls, len(classifier), test.heldout)
        metrics.update(zs)
        tables["per_class"] = per_class_table(cm, data.classes)
        tables["prompts"] = [{"template": t} for t in data.templates]
        figures["lit_zeroshot_confusion.png"] = confusion_figure(
            cm, data.classes, f"LiT zero-shot, test top-1 {zs['zeroshot_top1']:.3f}")
        headline += f" zero-shot top-1 {zs['zeroshot_top1']:.3f} (chance {zs['chance_top1']:.3f})"
        if "heldout_zeroshot_top1" in zs:
            headline += f", held-out combos {zs['heldout_zeroshot_top1']:.3f}"
        headline += ","
    headline += f" i2t R@1 {metrics['retrieval_i2t_r1']:.3f}, t2i R@1 {metrics['retrieval_t2i_r1']:.3f}"
    if data.captions_missing:
        instead = "left out" if data.captions_missing_dropped else "class prompts used"
        headline += f"; {data.captions_missing} of {len(test.emb)} samples had no caption ({instead})"
    return LitReport(metrics=metrics, history=history, tables=tables, figures=figures, model=model,
                     split_sizes=data.sizes(), headline=headline, curves_logged=bool(live))


def log_report(tracker, run_id: str, report: LitReport, cache_dir: str) -> dict[str, str]:
    """Everything a LiT run shows in MLflow: params, curves (unless they went live), metrics, figures,
    tables, the feature cache and data set it read (lineage), and the text tower as an MLflow model."""
    params = {"cache_dir": cache_dir, **{f"split_{k}": v for k, v in report.split_sizes.items()}}
    tracker.log_report(run_id, params=params,
                       metrics=report.metrics, history=report.history, figures=report.figures, tables=report.tables,
                       table_prefix="lit_", curves_logged=report.curves_logged,
                       inputs=cache_lineage(cache_dir, "training", dataset_context="source"))
    model_uri = tracker.log_pytorch_model(run_id, report.model, "text_tower")["model_uri"]
    return {"cache_dir": cache_dir, "text_tower": model_uri}
