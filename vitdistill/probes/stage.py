"""The probe stage: every probe on one feature cache, with what to log and show.

    report = probe_cache("vitdistill-cache/features/effnet_lite0_imagenet-...", ProbeConfig())
    report.metrics["linear_top1"], report.figures["confusion.png"], report.tables["per_class"]

Splits come from the cache (recorded per sample at extraction); hyper-parameters are chosen on
val; test is read once per probe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vitdistill.cache.reader import FeatureCache
from vitdistill.config import ProbeConfig
from vitdistill.errors import DataError
from vitdistill.probes.fewshot import FewShotResult, fewshot_probe
from vitdistill.probes.knn import knn_probe
from vitdistill.probes.linear import linear_probe
from vitdistill.probes.plots import confusion_figure, per_class_table


@dataclass
class ProbeReport:
    """Everything the probes found; JSON-serialisable (``to_dict``), figures drawn on demand."""

    metrics: dict[str, float]
    tables: dict[str, list[dict[str, Any]]]
    confusion: list[list[int]]  # (C, C) linear-probe test counts, row = true class
    classes: list[str]
    split_sizes: dict[str, int] = field(default_factory=dict)
    headline: str = ""

    def figures(self) -> dict[str, Any]:
        """Artifact name -> matplotlib Figure."""
        top1 = self.metrics["linear_top1"]
        return {"confusion.png": confusion_figure(np.asarray(self.confusion), self.classes, f"linear probe, test top-1 {top1:.3f}")}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _split(fc: FeatureCache, name: str) -> tuple[np.ndarray, np.ndarray]:
    d = fc.load(split=name)
    if d["cls"] is None:
        raise DataError(f"{fc.cache_dir}: split {name!r} has samples without a 'cls' label; probes need class labels")
    return d["emb"], d["cls"]


def fewshot_table(few: FewShotResult, classes: list[str], seeds: int) -> list[dict[str, Any]]:
    """One row per requested shot count; a skipped one has empty numbers and a note naming the short class."""
    rows = []
    for s in sorted(few.short_classes):
        if s in few.skipped:
            rows.append({"shots": s, "mean_top1": None, "std_top1": None, "chosen_l2": None, "seeds": seeds,
                         "note": few.skip_note(s, classes)})
        else:
            rows.append({"shots": s, "mean_top1": round(few.mean_top1[s], 4), "std_top1": round(few.std_top1[s], 4),
                         "chosen_l2": few.chosen_l2[s], "seeds": seeds, "note": ""})
    return rows


def probe_cache(cache_dir: str, cfg: ProbeConfig) -> ProbeReport:
    fc = FeatureCache.open(cache_dir)
    (xtr, ytr), (xva, yva), (xte, yte) = (_split(fc, s) for s in ("train", "val", "test"))
    # without class names in the manifest, the class count comes from train and val only (never test)
    classes = fc.classes or [str(c) for c in range(int(max(ytr.max(), yva.max())) + 1)]
    grid = tuple(cfg.l2_grid) if cfg.l2_grid else None

    lin = linear_probe(xtr, ytr, xva, yva, xte, yte, l2_grid=grid, normalize=cfg.normalize, num_classes=len(classes))
    few = fewshot_probe(xtr, ytr, xva, yva, xte, yte, shots=tuple(cfg.fewshot_shots), seeds=tuple(cfg.fewshot_seeds),
                        normalize=cfg.normalize, num_classes=len(classes))
    knn = knn_probe(xtr, ytr, xte, yte, ks=tuple(cfg.knn_k), temperature=cfg.knn_temperature, num_classes=len(classes))

    metrics = {f"linear_{k}": v for k, v in lin.metrics().items()}
    metrics.update({f"fewshot_{k}": v for k, v in few.metrics().items()})
    metrics.update({f"fewshot_{s}shot_top1_std": v for s, v in few.std_top1.items()})
    metrics.update(knn.metrics())
    tables = {
        "per_class": per_class_table(lin.confusion, classes),
        "linear_sweep": [{"l2": l2, "val_top1": round(acc, 4), "chosen": l2 == lin.chosen_l2}
                         for l2, acc in lin.val_top1_by_l2.items()],
        "fewshot": fewshot_table(few, classes, len(cfg.fewshot_seeds)),
    }
    sizes = {"train": len(ytr), "val": len(yva), "test": len(yte)}
    first_k = cfg.knn_k[0]
    shots_part = (f"{few.most_shots}-shot {few.mean_top1[few.most_shots]:.3f}" if few.most_shots is not None
                  else "few-shot skipped (a class has too few train samples)")
    headline = f"linear top-1 {lin.top1:.3f}, {shots_part}, kNN@{first_k} {knn.top1[first_k]:.3f}"
    return ProbeReport(metrics=metrics, tables=tables, confusion=lin.confusion.tolist(), classes=list(classes),
                       split_sizes=sizes, headline=headline)
