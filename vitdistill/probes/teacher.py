"""The one teacher probe: the probe stage's linear probe, saved beside the feature cache and reused by
distillation (``teacher_top1``) and evaluation (the teacher's classifier), so that every teacher number
of a run comes from one model.

    clf, summary = teacher_probe(cache_dir, cfg.probe)     # fits once per cache content, then loads
    clf.logits(teacher_embeddings)                         # (N, C); summary["top1"] is the probe stage's
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from vitdistill.cache import fs
from vitdistill.cache.reader import FeatureCache
from vitdistill.config import ProbeConfig
from vitdistill.errors import DataError
from vitdistill.probes.linear import LinearClassifier, LinearProbeResult, linear_probe


def probe_key(fc: FeatureCache, cfg: ProbeConfig) -> str:
    """The cache content and every setting that changes the fit."""
    blob = json.dumps([fc.content_sha256(), cfg.normalize, cfg.l2_grid, fc.classes], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def probe_urls(fc: FeatureCache, cfg: ProbeConfig) -> tuple[str, str]:
    key = probe_key(fc, cfg)
    return fs.join(fc.cache_dir, "probes", f"linear-{key}.npz"), fs.join(fc.cache_dir, "probes", f"linear-{key}.json")


def labelled_split(fc: FeatureCache, name: str, loaded: dict | None = None):
    """(emb, cls) of one split (``loaded``: ``fc.load(name)`` if already read)."""
    d = loaded if loaded is not None else fc.load(split=name)
    if d["cls"] is None:
        raise DataError(f"{fc.cache_dir}: split {name!r} has samples without a 'cls' label; probes need class labels")
    return d["emb"], d["cls"]


def fit_teacher_probe(fc: FeatureCache, cfg: ProbeConfig, splits=None) -> LinearProbeResult:
    """Fit the linear probe on the cache (``splits``: the three (emb, cls) pairs, if already loaded) and save it."""
    if splits is None:
        splits = [labelled_split(fc, s, d) for s, d in fc.load_splits(("train", "val", "test"),
                                                                                 arrays=("emb",)).items()]
    (xtr, ytr), (xva, yva), (xte, yte) = splits
    # without class names in the manifest, the class count comes from train and val only (never test)
    n = len(fc.classes) if fc.classes else int(max(ytr.max(), yva.max())) + 1
    grid = tuple(cfg.l2_grid) if cfg.l2_grid else None
    result = linear_probe(xtr, ytr, xva, yva, xte, yte, l2_grid=grid, normalize=cfg.normalize, num_classes=n)
    npz, summary = probe_urls(fc, cfg)
    result.classifier.save(npz)
    fs.write_json_atomic(summary, {"top1": result.top1, "top5": result.top5, "chosen_l2": result.chosen_l2,
                                   "num_classes": result.num_classes, "content": fc.content_sha256()})
    return result


def teacher_probe(cache_dir: str, cfg: ProbeConfig) -> tuple[LinearClassifier, dict[str, Any]]:
    """The saved probe of this cache content (fitted and saved first if the probe stage has not run)."""
    fc = FeatureCache.open(cache_dir)
    npz, summary = probe_urls(fc, cfg)
    try:
        return LinearClassifier.load(npz), fs.read_json(summary)
    except (FileNotFoundError, DataError):
        pass
    fit_teacher_probe(fc, cfg)
    return LinearClassifier.load(npz), fs.read_json(summary)
