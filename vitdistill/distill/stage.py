"""The distill stage: teacher -> student on the pipeline's image shards, with what to log and show.

    report = run_distill(load_config("configs/digits.yaml"))
    report.metrics["student_top1"], report.history, report.figures["loss_curves.png"], report.model

    torchrun --nproc_per_node=2 -m vitdistill.distill.stage -c configs/runlocal.yaml   # DDP (gloo on CPU)

Images come from ``resolve_inputs(cfg)`` and are split by the same key hash as the feature cache.
``distill.mode=cached`` first builds (or reuses) the view cache (:mod:`vitdistill.distill.viewcache`);
``online`` runs the teacher on every batch. Checkpoints go to a directory addressed by everything
that defines the run, under ``{cache.root}/distill/``, so ``distill.resume`` picks up a killed run.

Metrics: ``student_top1`` (task head, test split), ``teacher_top1`` (the teacher's own head when its
label space is the task's; otherwise the linear-probe top-1 of its embeddings from the feature
cache, when the extract stage has built it), ``agreement``/``agreement_top5``/``kl`` (student vs
teacher in the teacher's label space, test split, KL(teacher || student)), ``student_probe_top1``
(linear probe on the student's embeddings), parameters and GFLOPs per image of both models, and
the last epoch's losses as ``final_*``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from vitdistill.cache import fs
from vitdistill.config import VitdistillConfig
from vitdistill.data.ingest import InputSet, resolve_inputs
from vitdistill.data.shards import ShardIndex, SplitRule, index_shards
from vitdistill.distill.data import LabelSubset, StreamBatches, check_labels, eval_batches, num_classes
from vitdistill.distill.evaluate import collect, count_params, gflops, student_fn, teacher_fn, test_pass, top1
from vitdistill.distill.losses import NEEDS_TEACHER_LOGITS, create_distill_loss
from vitdistill.distill.students import ProbeHead, Student, create_student
from vitdistill.distill.viewcache import build_view_cache, plan_view_cache, teacher_spec
from vitdistill.distill.views import InputSpec
from vitdistill.errors import ConfigError, DataError
from vitdistill.live import live_callbacks
from vitdistill.models.teachers import Teacher, create_teacher, resolve_device
from vitdistill.tracking import Lineage, cache_lineage, inputs_lineage
from vitdistill.trainer import Callback, Trainer, TrainerConfig, TrainResult, barrier, world


@dataclass
class DistillReport:
    metrics: dict[str, float]
    history: list[dict[str, float]]  # one row per epoch: epoch, loss, ce_loss, kd_loss, ..., lr, seconds
    model: nn.Module  # the trained student, in eval mode on the CPU
    figures: dict[str, Any] = field(default_factory=dict)  # artifact name -> matplotlib Figure
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    headline: str = ""
    checkpoint_dir: str | None = None
    view_cache_dir: str | None = None
    split_sizes: dict[str, int] = field(default_factory=dict)
    curves_logged: bool = False  # the history went to the MLflow run live, during training
    inputs: list[Lineage] = field(default_factory=list)  # data sets and caches read, for the run's lineage


# --------------------------------------------------------------------------- setup


def init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); True if this call created it."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def train_device(spec: str) -> torch.device:
    """``distill.device``; under torchrun on GPUs, each rank takes its ``LOCAL_RANK`` GPU."""
    device = resolve_device(spec)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def run_dir(cfg: VitdistillConfig, teacher: Teacher, inputs: InputSet, world_size: int) -> str:
    """Checkpoints of one run: addressed by the student, the distill settings, teacher, data and world size."""
    d = cfg.distill.model_dump(mode="json", exclude={"enabled", "resume", "checkpoint_every", "device"})
    address = {"student": cfg.student.model_dump(mode="json"), "distill": d, "teacher": teacher.fingerprint(),
               "teacher_cfg": cfg.teacher.model_dump(mode="json", include={"name", "pretrained", "checkpoint"}),
               "dataset": inputs.fingerprint, "split": SplitRule.from_config(cfg.data).to_dict(), "world_size": world_size,
               "on_error": cfg.data.on_error}
    digest = hashlib.sha256(json.dumps(address, sort_keys=True).encode()).hexdigest()
    return fs.join(cfg.cache.root, "distill", f"{cfg.student.name}-{digest[:16]}", "checkpoints")


def build_student(cfg: VitdistillConfig, teacher: Teacher, num_classes: int) -> Student:
    weights = {n: w for n, w in cfg.distill.losses.items() if w > 0}
    needs_logits = any(n in NEEDS_TEACHER_LOGITS for n in weights)
    if needs_logits and teacher.num_classes == 0:
        raise ConfigError(f"distill.losses {sorted(weights)}: teacher {teacher.name!r} has no classifier; "
                          "use only the 'feature' loss")
    return create_student(cfg.student, num_classes, teacher.num_features, teacher_classes=teacher.num_classes,
                          kd_head=needs_logits, feature_head="feature" in weights, dist_token=cfg.distill.dist_token,
                          seed=cfg.distill.seed)


def student_spec(student: Student) -> InputSpec:
    return InputSpec(student.img_size, tuple(student.mean), tuple(student.std))


# --------------------------------------------------------------------------- evaluation


def teacher_probe_top1(cfg: VitdistillConfig, inputs: InputSet) -> float | None:
    """The teacher probe's test top-1 (the probe stage's saved probe) when the extract stage built the cache."""
    from vitdistill.extract import plan_extraction
    from vitdistill.probes.teacher import teacher_probe

    plan = plan_extraction(cfg, inputs)
    if not fs.exists(plan.manifest_url):
        return None
    try:
        return float(teacher_probe(plan.cache_dir, cfg.probe)[1]["top1"])
    except DataError:  # a cache without labels has no teacher probe
        return None


def probe_head_wanted(d, has_labels: bool) -> bool:
    """``distill.head``: auto fits a probe head when the training loss saw no label."""
    if d.head != "auto":
        return d.head == "probe"
    return d.alpha == 0 or d.data is not None or d.label_fraction == 0 or not has_labels


def evaluate_distill(cfg: VitdistillConfig, student: Student, teacher: Teacher, inputs: InputSet,
                     index: ShardIndex) -> dict[str, float]:
    """Test-split metrics of student and teacher (one decode of each test image for both) and a linear probe
    on the student's embeddings (its N x D train/val/test features are the one array that grows with N).
    With a probe head (``distill.head``), the probe fitted on the ``distill.label_fraction`` subset of the
    train labels becomes the student's task head before it is scored."""
    from vitdistill.probes.linear import linear_probe

    d = cfg.distill
    sspec, tspec = student_spec(student), teacher_spec(teacher, d.teacher_size)
    rule, on_error = SplitRule.from_config(cfg.data), cfg.data.on_error
    n_classes = num_classes(inputs, index)
    metrics: dict[str, float] = {}
    tested = bool(index.total("test"))
    if tested:  # the test split streamed once through both models; the student's embeddings are what is kept
        test_emb, labels, test_metrics = test_pass(eval_batches(inputs.shards, rule, "test", on_error),
                                                   student_fn(student, sspec), teacher_fn(teacher, tspec),
                                                   size=index.total("test"))
    probe_head = probe_head_wanted(d, index.has_labels)
    if probe_head and not (index.has_labels and index.total("train") and index.total("val")):
        raise ConfigError("distill.head=probe: the task head is a probe fitted on data's labelled train and val "
                          "splits, and data has none; set data to a labelled set or distill.head=trained")
    if index.has_labels and tested and index.total("train") and index.total("val"):
        emb_only = student_fn(student, sspec)
        feats = {}
        for split in ("train", "val"):
            subset = LabelSubset(d.label_fraction, d.seed) if split == "train" else None
            outs, lab = collect(eval_batches(inputs.shards, rule, split, on_error, labels_of=subset),
                                {"s": lambda imgs: {"emb": emb_only(imgs)["emb"]}}, size=index.total(split))
            feats[split] = (outs["s"]["emb"], lab)
        full = linear_probe(*feats["train"], *feats["val"], test_emb, labels, normalize=cfg.probe.normalize,
                            num_classes=n_classes or None) if (feats["train"][1] >= 0).all() else None
        if full is not None:
            metrics["student_probe_top1"] = full.top1
        if probe_head:
            x, y = feats["train"]
            kept = y >= 0
            if not kept.any():
                raise ConfigError(f"distill.label_fraction={d.label_fraction} keeps no training label for the "
                                  "probe head")
            probe = full if d.label_fraction >= 1.0 and full is not None else linear_probe(
                x[kept], y[kept], *feats["val"], test_emb, labels, normalize=cfg.probe.normalize,
                num_classes=n_classes or None)
            student.head = ProbeHead(probe.classifier)
            test_metrics["student_top1"] = top1(probe.classifier.logits(test_emb).astype(np.float32), labels)
            metrics["head_labels"] = float(kept.sum())
    if tested:  # (unlabelled images count in no top-1: without labels test_pass reports none)
        if teacher.num_classes != n_classes:  # the teacher's logits are not this task's classes
            test_metrics.pop("teacher_top1", None)
        metrics.update(test_metrics)
    if index.has_labels and "teacher_top1" not in metrics:
        probed = teacher_probe_top1(cfg, inputs)
        if probed is not None:
            metrics["teacher_top1"] = probed
    metrics["student_params"] = float(count_params(student))
    metrics["teacher_params"] = float(count_params(teacher.model))
    metrics["student_gflops"] = gflops(student, sspec.size)
    metrics["teacher_gflops"] = gflops(teacher.model, tspec.size)
    return metrics


def data_efficiency(cfg: VitdistillConfig, student: Student, teacher: Teacher, inputs: InputSet, index: ShardIndex,
                    metrics: dict[str, float], progress: bool) -> list[dict[str, Any]]:
    """Test top-1 against the share of training labels, at this run's budget: the labels-only student
    trained on each share, and the distilled one (a probe head refitted on the share, no retraining;
    a trained head retrains with ``distill.label_fraction``)."""
    import copy

    d = cfg.distill
    rows = []
    for f in sorted(set(d.data_efficiency)):
        def variant(**update) -> VitdistillConfig:
            return cfg.model_copy(update={"distill": d.model_copy(update={"data_efficiency": [], "label_fraction": f,
                                                                           **update})})
        labels_only = run_distill(variant(alpha=1.0, losses={}, head="trained", data=None), progress=progress)
        if probe_head_wanted(d, index.has_labels):
            distilled = evaluate_distill(variant(), copy.deepcopy(student), teacher, inputs, index)
        elif f == d.label_fraction:
            distilled = metrics
        else:
            distilled = run_distill(variant(), progress=progress).metrics
        rows.append({"label_fraction": f, "labels_only_top1": labels_only.metrics.get("student_top1"),
                     "distilled_top1": distilled.get("student_top1"), "teacher_top1": metrics.get("teacher_top1"),
                     "train_labels": round(f * index.total("train"))})
    return rows


def training_set(cfg: VitdistillConfig, inputs: InputSet, index: ShardIndex, progress: bool
                 ) -> tuple[VitdistillConfig, InputSet, ShardIndex]:
    """The config, shards and index of the images the student trains on: data's train split, or every
    image of ``distill.data`` (its own val/test fractions are 0; data's splits still evaluate)."""
    if cfg.distill.data is None:
        return cfg, inputs, index
    data = cfg.distill.data.model_copy(update={"val_fraction": 0.0, "test_fraction": 0.0})
    dcfg = cfg.model_copy(update={"data": data})
    train_inputs = resolve_inputs(dcfg, progress=progress)
    if train_inputs.fingerprint == inputs.fingerprint:
        raise ConfigError("distill.data is the data set that is evaluated: its val and test images would train "
                          "the student; point distill.data at other images or leave it unset")
    rule = SplitRule.from_config(data)
    return dcfg, train_inputs, index_shards(train_inputs.shards, rule, data.on_error, train_inputs.fingerprint,
                                            cfg.cache.root)


def loss_curves_figure(history: list[dict[str, float]], title: str) -> Figure:
    """Every ``*loss`` column of the per-epoch history against the epoch."""
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    epochs = [h["epoch"] + 1 for h in history]
    for key in sorted(k for k in (history[0] if history else {}) if k.endswith("loss")):
        ax.plot(epochs, [h[key] for h in history], marker="o", label=key, lw=2.5 if key == "loss" else 1.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean training loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


# --------------------------------------------------------------------------- the stage


def run_distill(cfg: VitdistillConfig, *, progress: bool = True, callbacks: Sequence[Callback] = (),
                run_id: str | None = None) -> DistillReport:
    """Train ``cfg.student`` from ``cfg.teacher`` (``cfg.distill``), evaluate it, and report. With ``run_id``,
    rank 0 logs the training to that MLflow run as it goes (:func:`vitdistill.live.live_callbacks`)."""
    d = cfg.distill
    device = train_device(d.device)
    created_group = init_distributed(device)
    try:
        rank, world_size = world()
        if d.batch_size % world_size:
            raise ConfigError(f"distill.batch_size={d.batch_size} must be a multiple of the {world_size} processes")
        teacher = create_teacher(cfg.teacher)
        if rank == 0:  # ingest and index once; the other ranks then find them finished
            inputs, index, (tcfg_data, train_inputs, train_index) = _inputs(cfg, progress)
        barrier()
        if rank:
            inputs, index, (tcfg_data, train_inputs, train_index) = _inputs(cfg, False)
        check_labels(index, inputs)
        student = build_student(cfg, teacher, num_classes(inputs, index))
        loss_fn = create_distill_loss(d.alpha, d.losses, d.temperature)  # unknown loss names fail here, early
        sspec, tspec = student_spec(student), teacher_spec(teacher, d.teacher_size)
        train_rule, on_error = SplitRule.from_config(tcfg_data.data), tcfg_data.data.on_error
        num_train = train_index.total("train")
        view_cache_dir = None
        t0 = time.perf_counter()
        needs_teacher = d.alpha < 1.0 and any(w > 0 for w in d.losses.values())
        if d.mode == "cached" and needs_teacher:
            if rank == 0:
                plan, manifest = build_view_cache(tcfg_data, train_inputs, progress=progress)
            barrier()
            if rank:
                plan = plan_view_cache(tcfg_data, train_inputs)
                manifest = fs.read_json(plan.manifest_url)
            view_cache_dir = plan.cache_dir
            num_train = int(manifest["num_samples"])
            data = StreamBatches.cached(train_inputs, plan.cache_dir, manifest, train_rule, d, on_error, sspec,
                                        rank=rank, world=world_size)
        else:
            data = StreamBatches.online(train_inputs, train_index, train_rule, d, on_error, sspec,
                                        teacher if needs_teacher else None, tspec, rank=rank, world=world_size)
        cache_seconds = time.perf_counter() - t0
        ckpt_dir = run_dir(tcfg_data, teacher, train_inputs, world_size)
        tcfg = TrainerConfig(epochs=d.epochs, lr=d.lr, weight_decay=d.weight_decay, warmup_fraction=d.warmup_fraction,
                             grad_clip=d.grad_clip, optimizer=d.optimizer, ema_decay=d.ema_decay,
                             precision=d.precision, device=str(device), checkpoint_every=d.checkpoint_every,
                             checkpoint_dir=ckpt_dir, resume=d.resume, progress=progress, name="distill")
        live = live_callbacks(cfg.tracking, run_id)
        result = Trainer(student, loss_fn, data, tcfg, [*callbacks, *live]).fit()
        student.to("cpu").eval()
        metrics = evaluate_distill(cfg, student, teacher, inputs, index)
        metrics.update(train_metrics(result, num_train, cache_seconds))
        tables: dict[str, list[dict[str, Any]]] = {"history": result.history}
        figures = {"loss_curves.png": loss_curves_figure(result.history, f"{cfg.student.name} from {teacher.name} "
                                                         f"({d.mode})")}
        if d.data_efficiency and world_size == 1:
            tables["data_efficiency"] = data_efficiency(cfg, student, teacher, inputs, index, metrics, progress)
        return DistillReport(
            metrics=metrics,
            history=result.history,
            model=student,
            figures=figures,
            tables=tables,
            headline=headline(metrics),
            checkpoint_dir=ckpt_dir,
            view_cache_dir=view_cache_dir,
            split_sizes={s: index.total(s) for s in ("train", "val", "test")},
            curves_logged=bool(live),
            inputs=distill_lineage(cfg, inputs, train_inputs, view_cache_dir,
                                   manifest if view_cache_dir else None) if rank == 0 else [],
        )
    finally:
        if created_group:
            dist.destroy_process_group()


def _inputs(cfg: VitdistillConfig, progress: bool):
    inputs = resolve_inputs(cfg, progress=progress)
    index = index_shards(inputs.shards, SplitRule.from_config(cfg.data), cfg.data.on_error, inputs.fingerprint,
                         cfg.cache.root)
    return inputs, index, training_set(cfg, inputs, index, progress)


def distill_lineage(cfg: VitdistillConfig, inputs: InputSet, train_inputs: InputSet, view_cache_dir: str | None,
                    view_manifest: dict | None) -> list[Lineage]:
    """What a distill run read: the images it trained on, the evaluated data set (when distinct), the view
    cache (``distill.mode=cached``) and the feature cache the teacher probe came from, when there is one."""
    from vitdistill.extract import plan_extraction

    out = [inputs_lineage(train_inputs, "training")]
    if train_inputs.fingerprint != inputs.fingerprint:
        out.append(inputs_lineage(inputs, "evaluation"))
    if view_cache_dir and view_manifest is not None:
        digest = hashlib.sha256(json.dumps([s.get("sha256") or s.get("name") for s in view_manifest.get("shards", [])],
                                           sort_keys=True).encode()).hexdigest()
        out.append(Lineage("view_cache", f"views/{view_cache_dir.rstrip('/').rsplit('/', 1)[-1]}", digest,
                           fs.join(view_cache_dir, "manifest.json"), "training",
                           {"samples": view_manifest.get("num_samples")}))
    plan = plan_extraction(cfg, inputs)
    if fs.exists(plan.manifest_url):
        out += [x for x in cache_lineage(plan.cache_dir, "evaluation") if x.kind == "feature_cache"]
    return out


def train_metrics(result: TrainResult, num_train: int, cache_seconds: float) -> dict[str, float]:
    out = {f"final_{k}": v for k, v in (result.history[-1] if result.history else {}).items()
           if k.endswith("loss")}
    train_s = sum(h["seconds"] for h in result.history)
    out["train_seconds"] = train_s
    out["steps"] = float(result.step)
    out["resumed_from_step"] = float(result.resumed_from or 0)
    if train_s > 0:
        out["train_images_per_s"] = num_train * len(result.history) / train_s
    out["view_cache_seconds"] = cache_seconds
    return out


def headline(m: dict[str, float]) -> str:
    parts = []
    if "student_top1" in m:
        teacher = f" (teacher {m['teacher_top1']:.3f})" if "teacher_top1" in m else ""
        parts.append(f"student top-1 {m['student_top1']:.3f}{teacher}")
    if "agreement" in m:
        parts.append(f"agreement {m['agreement']:.3f}, KL {m['kl']:.3f}")
    parts.append(f"{m['student_params'] / 1e6:.2f}M params / {m['student_gflops']:.3f} GFLOPs vs teacher "
                 f"{m['teacher_params'] / 1e6:.2f}M / {m['teacher_gflops']:.3f}")
    return ", ".join(parts)


def log_report(tracker, run_id: str, report: DistillReport, cfg: VitdistillConfig) -> dict[str, str | None]:
    """Everything a distill run shows in MLflow: params, per-epoch curves, metrics, figures, tables, and
    the student as an MLflow model, registered (``distill.register_as``) with its metrics as version tags."""
    d = cfg.distill
    params = {"student": cfg.student.name, "teacher": cfg.teacher.name, "mode": d.mode, "nproc": d.nproc,
              "checkpoint_dir": report.checkpoint_dir, "view_cache_dir": report.view_cache_dir,
              **{f"split_{k}": v for k, v in report.split_sizes.items()}}
    tracker.log_report(run_id, params=params, metrics=report.metrics, history=report.history, figures=report.figures,
                       tables=report.tables, table_prefix="distill_", curves_logged=report.curves_logged,
                       inputs=report.inputs)
    t = cfg.tracking
    keep = ("student_top1", "teacher_top1", "agreement", "kl", "student_params", "student_gflops", t.champion_metric)
    logged = tracker.log_student(run_id, report.model, "student", registered_model_name=d.register_as,
                                 version_tags={k: round(report.metrics[k], 6) for k in keep if k in report.metrics},
                                 champion=(t.champion_metric, t.champion_mode))
    if logged["version"]:
        tracker.set_tags(run_id, {"vitdistill.model_version": logged["version"],
                                  "vitdistill.champion_version": logged["champion"]})
    return {"student": logged["model_uri"], "checkpoint_dir": report.checkpoint_dir,
            "registered_model": f"{logged['registered_model']}/{logged['version']}" if logged["version"] else None}


def main(argv: list[str] | None = None) -> None:
    """``python -m vitdistill.distill.stage [-c CONFIG] [--set k=v ...] [--run-id ID --result PATH]``: one
    run (torchrun-able). With ``--run-id``, rank 0 logs it to that MLflow run; ``--result`` gets a JSON
    summary (metrics, headline, paths)."""
    import argparse

    from vitdistill.config import load_config
    from vitdistill.tracking import get_tracker

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("-c", "--config")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--run-id", help="MLflow run to log to (rank 0)")
    ap.add_argument("--result", help="write a JSON summary here (rank 0)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.sets)
    report = run_distill(cfg, progress=False, run_id=args.run_id)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    paths = log_report(get_tracker(cfg.tracking), args.run_id, report, cfg) if args.run_id else {}
    summary = {"metrics": report.metrics, "headline": report.headline, "paths": paths,
               "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    if args.result:
        with open(args.result, "w") as f:
            json.dump(summary, f)
    print(report.headline)


if __name__ == "__main__":
    main()
