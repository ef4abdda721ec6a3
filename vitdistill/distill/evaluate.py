"""Evaluating a distilled student: accuracy, agreement with the teacher, cost, and features for a probe.

    emb, labels, metrics = test_pass(eval_batches(shards, rule, "test", on_error), student_fn(student, spec),
                                     teacher_fn(teacher, tspec), size=index.total("test"))
    metrics["student_top1"], metrics["agreement"], metrics["kl"]  # one decode for both models, reduced as it goes
    outs, labels = collect(eval_batches(shards, rule, "train", on_error), {"s": student_fn(student, spec)},
                           size=index.total("train"))   # name -> output -> (N, ...), each filled into one array
    gflops(student, spec.size)             # one image, torch.utils.flop_counter

Every view here is the evaluation view (the whole image, unflipped), rendered at each model's side.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitdistill.distill.losses import kl_per_sample
from vitdistill.distill.views import InputSpec, full_view, render_batch
from vitdistill.models.teachers import Teacher

ModelFn = Callable[[list[torch.Tensor]], dict[str, torch.Tensor]]


def _full(imgs: list[torch.Tensor], spec: InputSpec) -> torch.Tensor:
    return render_batch(imgs, [full_view(img.shape[1], img.shape[2]) for img in imgs], spec)  # (B, 3, S, S)


def student_fn(model: nn.Module, spec: InputSpec) -> ModelFn:
    """The student's outputs (eval mode) on the evaluation views: ``logits``, ``emb``, ``kd_logits``..."""
    device = next(model.parameters()).device
    return lambda imgs: model(_full(imgs, spec).to(device))


def teacher_fn(teacher: Teacher, spec: InputSpec) -> ModelFn:
    def run(imgs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        emb, logits = teacher(_full(imgs, spec))
        return {"emb": emb} if logits is None else {"emb": emb, "logits": logits}

    return run


class _Column:
    """Rows appended a batch at a time into one array allocated for ``size`` rows up front (grown by doubling
    if more come): no list of per-batch pieces, and no second copy to concatenate them at the end."""

    def __init__(self, size: int) -> None:
        self.size, self.n, self.buf = size, 0, None

    def add(self, v: np.ndarray) -> None:
        if self.buf is None:
            self.buf = np.empty((max(self.size, len(v)), *v.shape[1:]), dtype=v.dtype)
        elif self.n + len(v) > len(self.buf):
            grown = np.empty((max(2 * len(self.buf), self.n + len(v)), *self.buf.shape[1:]), dtype=self.buf.dtype)
            grown[:self.n] = self.buf[:self.n]
            self.buf = grown
        self.buf[self.n:self.n + len(v)] = v
        self.n += len(v)

    def array(self, dtype=np.float32) -> np.ndarray:
        return np.zeros(0, dtype=dtype) if self.buf is None else self.buf[:self.n]


@torch.no_grad()
def collect(batches: Iterable[tuple[list[torch.Tensor], np.ndarray]], fns: dict[str, ModelFn], size: int = 0
            ) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray]:
    """Run every model on each batch of images once decoded: name -> output -> (N, ...) float32, and labels (N,).
    ``size``: the rows expected (the split's count), so each output is filled into one array allocated once."""
    parts: dict[str, dict[str, _Column]] = {name: {} for name in fns}
    labels = _Column(size)
    for imgs, lab in batches:
        labels.add(lab)
        for name, fn in fns.items():
            for k, v in fn(imgs).items():
                parts[name].setdefault(k, _Column(size)).add(v.float().cpu().numpy())
    outs = {name: {k: c.array() for k, c in p.items()} for name, p in parts.items()}
    return outs, labels.array(dtype=np.int64)


@torch.no_grad()
def test_pass(batches: Iterable[tuple[list[torch.Tensor], np.ndarray]], student: ModelFn, teacher: ModelFn,
              size: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """One decode of each test image for both models, reduced batch by batch: the student's ``emb`` (N, D), the
    one array kept (a probe head scores it), the labels (N,), and means over the images: ``student_top1`` and
    ``teacher_top1`` (labelled images; the teacher's only where it has logits), big_vision's distill distance
    (``agreement``, ``agreement_top5``, ``kl``: KL(teacher || student)) where the student has ``kd_logits``
    and the teacher logits, and ``feature_cosine`` where the student has ``feat``. Memory is O(N x D) for the
    embeddings alone, whatever the number of classes."""
    emb, labels = _Column(size), _Column(size)
    sums: dict[str, float] = {}
    n = labelled = 0

    def add(key: str, value: torch.Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(value.double().sum())

    for imgs, lab in batches:
        s, t = student(imgs), teacher(imgs)
        emb.add(s["emb"].float().cpu().numpy())
        labels.add(lab)
        y = torch.from_numpy(lab)
        valid = y >= 0
        n, labelled = n + len(lab), labelled + int(valid.sum())
        if "logits" in s:
            add("student_top1", (s["logits"].argmax(-1).cpu() == y)[valid])
        if "logits" in t:
            add("teacher_top1", (t["logits"].argmax(-1).cpu() == y)[valid])
            if "kd_logits" in s:
                sl, tl = s["kd_logits"].float().cpu(), t["logits"].float().cpu()
                t_top = tl.argmax(-1)
                add("agreement", sl.argmax(-1) == t_top)
                add("agreement_top5", (sl.topk(min(5, tl.shape[1]), dim=-1).indices == t_top[:, None]).any(-1))
                add("kl", kl_per_sample(sl, tl))
        if "feat" in s:
            add("feature_cosine", torch.nn.functional.cosine_similarity(s["feat"].float().cpu(), t["emb"].float().cpu(),
                                                                       dim=-1))
    per_label = {"student_top1", "teacher_top1"}
    metrics = {k: v / (labelled if k in per_label else n) for k, v in sums.items()
               if (labelled if k in per_label else n)}
    return emb.array(), labels.array(dtype=np.int64), metrics


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy over labelled rows: (N, C), (N,) -> float."""
    valid = labels >= 0
    return float((logits[valid].argmax(-1) == labels[valid]).mean()) if valid.any() else float("nan")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def gflops(model: nn.Module, size: int) -> float:
    """Forward GFLOPs (multiply-add = 2) of one (1, 3, size, size) image, counted by torch."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, 3, size, size, device=device))
    model.train(was_training)
    return counter.get_total_flops() / 1e9
