"""The probe stage: every probe on one feature cache, with what to log and show.

    report = probe_cache("vitdistill-cache/features/effnet_lite0_imagenet-...", ProbeConfig())
    report.metrics["linear_top1"], report.figures["confusion.png"], report.tables["per_class"]

Splits come from the cache (recorded per sample at extraction); hyper-parameters are chosen on
val; test is read once per probe.

A cache extracted with ``teacher.layers`` also gets a linear probe per block and one on all blocks
side by side (each block L2-normalised first when ``normalize``): metrics ``layer{b}_linear_top1``
(``b`` the block index as configured, e.g. ``layer-2_linear_top1``), ``layers_concat_linear_top1``,
and ``best_layer`` / ``best_layer_linear_top1``, the block with the best *val* top-1 (test never
chooses; a tie goes to the deeper block), plus the table ``layers``.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vitdistill.cache.reader import FeatureCache, read_only, spill_array
from vitdistill.config import ProbeConfig
from vitdistill.errors import CacheError
from vitdistill.probes.fewshot import FewShotResult, fewshot_probe
from vitdistill.probes.inputs import row_chunks, unit_rows
from vitdistill.probes.knn import knn_probe
from vitdistill.probes.linear import linear_probe
from vitdistill.probes.teacher import fit_teacher_probe, labelled_split
from vitdistill.probes.plots import confusion_figure, per_class_table

log = logging.getLogger(__name__)


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


def side_by_side(x: np.ndarray, cols: list[slice], normalize: bool, spill_dir: str | None, name: str) -> np.ndarray:
    """The blocks ``cols`` of ``x`` (N, sum D_l), each L2-normalised when ``normalize``, side by side as float32,
    filled chunk by chunk: a read-only memory map in ``spill_dir`` (``name``.npy), else an array."""
    shape = (len(x), sum(c.stop - c.start for c in cols))
    out = spill_array(spill_dir, name, np.float32, shape) if spill_dir is not None else np.empty(shape, np.float32)
    for rows in row_chunks(*shape):
        out[rows] = np.concatenate([unit_rows(x[:, c], rows, normalize) for c in cols], axis=1)
    return read_only(out) if spill_dir is not None else out


def probe_layers(fc: FeatureCache, feats: dict[str, np.ndarray], labels: dict[str, np.ndarray], cfg: ProbeConfig,
                 num_classes: int, spill_dir: str | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """A linear probe per cached block and on their concatenation (``feats``: split -> (N, sum D_l), arrays or
    memory maps); the best block chosen on val. A block is probed on a column view of ``feats`` (no copy); the
    concatenation of the normalised blocks is written once per split, to ``spill_dir`` when given."""
    spec = fc.manifest["teacher"]["layers"]
    splits = ("train", "val", "test")
    offsets = np.cumsum([0, *spec["dims"]])
    grid = tuple(cfg.l2_grid) if cfg.l2_grid else None

    def probe(cols: list[slice]):
        xs = ([feats[s][:, cols[0]] for s in splits] if len(cols) == 1 else
              [side_by_side(feats[s], cols, cfg.normalize, spill_dir, f"{s}-layers-concat") for s in splits])
        return linear_probe(xs[0], labels["train"], xs[1], labels["val"], xs[2], labels["test"], l2_grid=grid,
                            normalize=cfg.normalize, num_classes=num_classes)

    metrics: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    slices = [slice(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:])]
    for block, dim, cols in zip(spec["blocks"], spec["dims"], slices):
        r = probe([cols])
        metrics[f"layer{block}_linear_top1"] = r.top1
        rows.append({"layer": str(block), "dim": dim, "val_top1": round(max(r.val_top1_by_l2.values()), 4),
                     "test_top1": round(r.top1, 4), "chosen_l2": r.chosen_l2})
    best = max(range(len(rows)), key=lambda i: (rows[i]["val_top1"], i))  # a tie goes to the deeper block
    r = probe(slices)
    metrics["layers_concat_linear_top1"] = r.top1
    rows.append({"layer": "concat", "dim": int(offsets[-1]), "val_top1": round(max(r.val_top1_by_l2.values()), 4),
                 "test_top1": round(r.top1, 4), "chosen_l2": r.chosen_l2})
    metrics["best_layer"] = float(spec["blocks"][best])
    metrics["best_layer_linear_top1"] = metrics[f"layer{spec['blocks'][best]}_linear_top1"]
    return metrics, rows


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
    """Every probe; the linear one is saved as the run's teacher probe (:mod:`vitdistill.probes.teacher`).

    The splits are spilled to a temporary directory (local disk, removed at the end) and probed from
    read-only memory maps in the cache's dtype (float16 by default), so caches larger than memory can
    be probed: only the linear probe holds its train (+ val) rows in memory, as float32.
    """
    with tempfile.TemporaryDirectory(prefix="vitdistill-probe-") as spill:
        return probe_spilled(cache_dir, cfg, spill)


def probe_spilled(cache_dir: str, cfg: ProbeConfig, spill_dir: str) -> ProbeReport:
    fc = FeatureCache.open(cache_dir)
    # one pass over the shards; the logits are not read (an ImageNet teacher's are 1,000 values per image)
    loaded = fc.load_splits(("train", "val", "test"), spill_dir=spill_dir, arrays=("emb", "layers"))
    splits = [labelled_split(fc, s, loaded[s]) for s in ("train", "val", "test")]
    (xtr, ytr), (xva, yva), (xte, yte) = splits
    # without class names in the manifest, the class count comes from train and val only (never test)
    classes = fc.classes or [str(c) for c in range(int(max(ytr.max(), yva.max())) + 1)]
    log.info("probing %s: %d classes, %d train / %d val / %d test samples", cache_dir, len(classes), len(ytr),
             len(yva), len(yte))

    lin = fit_teacher_probe(fc, cfg, splits)
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
    log.info("probes done: %s", headline)
    if "layers" in fc.manifest["teacher"]:
        if any(loaded[s]["layers"] is None for s in loaded):
            raise CacheError(f"{cache_dir}: the manifest lists teacher layers but some samples have no layers.npy")
        layer_metrics, tables["layers"] = probe_layers(fc, {s: loaded[s]["layers"] for s in loaded},
                                                       {"train": ytr, "val": yva, "test": yte}, cfg, len(classes),
                                                       spill_dir)
        metrics.update(layer_metrics)
        headline += (f"; best layer {int(layer_metrics['best_layer'])} {layer_metrics['best_layer_linear_top1']:.3f}, "
                     f"all layers {layer_metrics['layers_concat_linear_top1']:.3f}")
    return ProbeReport(metrics=metrics, tables=tables, confusion=lin.confusion.tolist(), classes=list(classes),
                       split_sizes=sizes, headline=headline)
