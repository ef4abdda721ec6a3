"""The evaluate stage: the teacher (a linear probe on its frozen features) and the distilled student,
side by side, through the configured evaluators on the test split.

    student = tracker.load_student(cfg.evaluate.student or distilled_uri)  # models:/NAME@champion, runs:/ID/student
    report = run_evaluate(cfg, cache_dir, student=student)
    report.metrics["teacher/calibration/ece"], report.metrics["student/robustness/mean_relative_drop"]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vitdistill.config import VitdistillConfig
from vitdistill.data.ingest import resolve_inputs
from vitdistill.data.shards import SplitRule, iter_samples
from vitdistill.errors import DataError
from vitdistill.evaluate.base import INPUTS, describe_metric, evaluator_class
from vitdistill.evaluate.shape_bias import cue_conflict_arrays
from vitdistill.models.teachers import Teacher, create_teacher
from vitdistill.tracking import cache_lineage

log = logging.getLogger(__name__)


class TeacherProbe:
    """Teacher embedding -> the run's one teacher probe (the probe stage's saved linear probe on the cached
    features, :mod:`vitdistill.probes.teacher`), so the report's teacher is the probe stage's teacher."""

    def __init__(self, teacher: Teacher, cache_dir: str, probe_cfg) -> None:
        from vitdistill.probes.teacher import teacher_probe

        self.classifier, self.summary = teacher_probe(cache_dir, probe_cfg)
        self.teacher, self.pil = teacher, teacher.pil_transform()

    def predict(self, images: np.ndarray) -> np.ndarray:  # (N, H, W, 3) uint8 -> (N, C)
        out = []
        for i in range(0, len(images), 64):
            px = np.stack([np.asarray(self.pil(Image.fromarray(im))) for im in images[i:i + 64]])
            emb, _ = self.teacher(self.teacher.normalize_uint8(torch.from_numpy(px)))
            out.append(self.classifier.logits(emb.float().cpu().numpy()).astype(np.float32))
        return np.concatenate(out)


class StudentClassifier:
    """The distilled student's task head, at its own resolution and normalisation."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()

    @torch.inference_mode()
    def predict(self, images: np.ndarray) -> np.ndarray:
        m, out = self.model, []
        mean = torch.tensor(m.mean).view(1, 3, 1, 1)
        std = torch.tensor(m.std).view(1, 3, 1, 1)
        for i in range(0, len(images), 256):
            x = torch.from_numpy(images[i:i + 256]).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
            x = F.interpolate(x, size=(m.img_size, m.img_size), mode="bilinear", antialias=True, align_corners=False)
            out.append(m((x - mean) / std)["logits"].float().numpy())
        return np.concatenate(out)


@dataclass
class TestImages:
    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,)
    groups: np.ndarray  # (N,) str, the subgroup of each image
    group_by: str


def load_test_images(cfg: VitdistillConfig) -> TestImages:
    """Up to ``evaluate.max_images`` labelled test images (the one reader and split rule, ``data.on_error``
    honoured), at native size unless ``evaluate.image_size``. Images of mixed sizes (an image folder) are
    resized on the shorter side and centre-cropped to one square side: ``evaluate.image_size``, else the
    median shorter side (at most 224), so the corruptions see every image at one scale."""
    e = cfg.evaluate
    imgs, labels, metas = [], [], []
    inputs = resolve_inputs(cfg, progress=False)
    for s in iter_samples(inputs.shards, SplitRule.from_config(cfg.data), "test", cfg.data.on_error):
        if s.label < 0:
            continue
        imgs.append(Image.fromarray(s.image))
        labels.append(s.label)
        metas.append(s.fields.get("json"))
        if len(imgs) >= e.max_images:
            break
    if not imgs:
        raise DataError("evaluate: the test split has no labelled images")
    side = e.image_size
    if side is None and len({im.size for im in imgs}) > 1:
        side = min(224, int(np.median([min(im.size) for im in imgs])))
    if side is not None:
        imgs = [square(im, side) for im in imgs]
    arrays = [np.asarray(im) for im in imgs]
    group_by = e.group_by
    if group_by == "auto":
        group_by = "colour" if all(metas) else "class"
    if group_by == "class":
        groups = np.array([str(y) for y in labels])
    else:
        import json

        try:
            groups = np.array([str(json.loads(m)[group_by]) for m in metas])
        except (TypeError, KeyError, ValueError):
            raise DataError(f"evaluate.group_by={group_by!r}: not an attribute of every test sample") from None
    return TestImages(np.stack(arrays), np.array(labels), groups, group_by)


def square(im: Image.Image, side: int) -> Image.Image:
    """Shorter side to ``side``, then the central ``side`` x ``side`` crop."""
    w, h = im.size
    scale = side / min(w, h)
    im = im.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.BILINEAR)
    w, h = im.size
    left, top = (w - side) // 2, (h - side) // 2
    return im.crop((left, top, left + side, top + side))


@dataclass
class EvaluateReport:
    metrics: dict[str, float]
    figures: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict]] = field(default_factory=dict)
    headline: str = ""


class StageInputs:
    """What the evaluate stage can pass to evaluators (:data:`~vitdistill.evaluate.base.INPUTS`), each built
    once, on first use: ``arguments(("test_images", "labels"))`` -> ``run`` keyword arguments, or None
    when this run lacks one of them (no cue-conflict images off the shapes data)."""

    def __init__(self, cfg: VitdistillConfig, data: TestImages, models: dict[str, Any]) -> None:
        self.cfg = cfg
        self.providers = {  # one per entry of INPUTS
            "test_images": lambda: {"images": data.images},
            "labels": lambda: {"labels": data.labels},
            "groups": lambda: {"groups": data.groups},
            "cue_conflict": self._cue_conflict,
            "teacher": lambda: {"teacher": models["teacher"]},
        }
        self._built: dict[str, dict[str, Any] | None] = {}

    def arguments(self, inputs: tuple[str, ...]) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        for name in inputs:
            if name not in self.providers:
                raise TypeError(f"evaluator input {name!r} has no provider; valid inputs: {', '.join(INPUTS)}")
            if name not in self._built:
                self._built[name] = self.providers[name]()
            if self._built[name] is None:
                return None
            out.update(self._built[name])
        return out

    def _cue_conflict(self) -> dict[str, np.ndarray] | None:
        if self.cfg.data.source != "shapes":
            return None  # cue-conflict images exist for the shapes classes only
        imgs, shape_labels, texture_labels = cue_conflict_arrays(
            self.cfg.evaluate.cue_conflict_images, seed=self.cfg.data.seed, size=self.cfg.data.image_size)
        return {"images": imgs, "labels": shape_labels, "texture_labels": texture_labels}


def run_evaluate(cfg: VitdistillConfig, cache_dir: str, student: torch.nn.Module | None = None, *,
                 on_evaluator: Callable[[str], None] | None = None) -> EvaluateReport:
    """Every evaluator in ``evaluate.evaluators``, built from its declared config, on its declared inputs, for
    each model it measures: metrics ``<model>/<evaluator>/<metric>``, figures ``<model>_<evaluator>_<name>.png``,
    tables ``<model>_<evaluator>_<name>`` and the ``teacher_vs_student`` table. ``on_evaluator(name)`` is
    called after each evaluator (run or skipped for want of its inputs)."""
    classes = {name: evaluator_class(name) for name in cfg.evaluate.evaluators}  # unknown names fail before any work
    data = load_test_images(cfg)
    models: dict[str, Any] = {"teacher": TeacherProbe(create_teacher(cfg.teacher), cache_dir, cfg.probe)}
    if student is not None:
        models["student"] = StudentClassifier(student)
    inputs = StageInputs(cfg, data, models)
    log.info("evaluating %s with %d evaluators: %s", " and ".join(models), len(classes), ", ".join(classes))
    metrics: dict[str, float] = {}
    figures: dict[str, Any] = {}
    tables: dict[str, list[dict]] = {}
    for name, cls in classes.items():
        arguments = inputs.arguments(cls.inputs)
        if arguments is None:
            log.info("evaluator %s skipped: this run lacks its inputs (%s)", name, ", ".join(cls.inputs))
            if on_evaluator:
                on_evaluator(name)
            continue
        for who in (m for m in cls.models if m in models):
            ev = cls.from_config(cfg)
            for key, value in ev.run(models[who], **arguments):
                if cls.metric(key) is None:
                    raise TypeError(f"evaluator {name!r} yielded {key!r}, which none of {cls.__name__}.metrics "
                                    f"declares; declared: {', '.join(m.name for m in cls.metrics)}")
                metrics[f"{who}/{name}/{key}"] = float(value)
            figures.update({f"{who}_{name}_{k}.png": fig for k, fig in ev.figures().items()})
            tables.update({f"{who}_{name}_{k}": rows for k, rows in ev.tables().items()})
        log.info("evaluator %s done", name)
        if on_evaluator:
            on_evaluator(name)
    keys = sorted({k.split("/", 1)[1] for k in metrics})
    table = [{"metric": k, **{who: round(metrics.get(f"{who}/{k}", float("nan")), 4) for who in models}} for k in keys]
    return EvaluateReport(metrics, figures, {"teacher_vs_student": table, **tables}, summary_line(metrics, models))


def log_report(tracker, run_id: str, report: EvaluateReport, cache_dir: str, student_uri: str | None) -> None:
    """What an evaluate run shows in MLflow: params, metrics, figures, tables, and its lineage: the feature
    cache and data set it read and the student model it evaluated (``evaluate.student``)."""
    params = {"cache_dir": cache_dir, "student_uri": student_uri or "-"}
    model_id = None
    if student_uri:
        model_id, version = tracker.model_identity(student_uri)
        params["student_model_version"] = version or "-"
    tracker.log_report(run_id, params=params, metrics=report.metrics, figures=report.figures, tables=report.tables,
                       inputs=cache_lineage(cache_dir, "evaluation"))
    if model_id:
        tracker.log_model_input(run_id, model_id)


def summary_line(metrics: dict[str, float], models: dict[str, Any]) -> str:
    """``teacher: top-1 0.912, ECE 0.059, ...; student: ...`` from the metrics declared with a ``short`` name."""
    parts = []
    for who in models:
        bits = []
        for key, value in metrics.items():
            found = describe_metric(key.removeprefix(f"{who}/")) if key.startswith(f"{who}/") else None
            if found and found[1].short:
                bits.append(f"{found[1].short} {value:.3f}")
        parts.append(f"{who}: " + ", ".join(bits))
    return "; ".join(parts)
