"""Evaluating a distilled student: accuracy, agreement with the teacher, cost, and features for a probe.

    outs, labels = collect(eval_batches(shards, rule, "test", on_error),
                           {"student": student_fn(student, spec), "teacher": teacher_fn(teacher, tspec)})
    outs["student"]["logits"], outs["teacher"]["emb"]      # (N, C), (N, Dt): one decode for both models
    distance(outs["student"]["kd_logits"], outs["teacher"]["logits"])   # agreement, KL(teacher || student)
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


@torch.no_grad()
def collect(batches: Iterable[tuple[list[torch.Tensor], np.ndarray]], fns: dict[str, ModelFn]
            ) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray]:
    """Run every model on each batch of images once decoded: name -> output -> (N, ...) float32, and labels (N,)."""
    parts: dict[str, dict[str, list[np.ndarray]]] = {name: {} for name in fns}
    labels = []
    for imgs, lab in batches:
        labels.append(lab)
        for name, fn in fns.items():
            for k, v in fn(imgs).items():
                parts[name].setdefault(k, []).append(v.float().cpu().numpy())
    outs = {name: {k: np.concatenate(v) for k, v in p.items()} for name, p in parts.items()}
    return outs, (np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64))


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy over labelled rows: (N, C), (N,) -> float."""
    valid = labels >= 0
    return float((logits[valid].argmax(-1) == labels[valid]).mean()) if valid.any() else float("nan")


def distance(student_logits: np.ndarray, teacher_logits: np.ndarray) -> dict[str, float]:
    """big_vision's distill distance evaluator: top-1/top-5 agreement and mean KL(teacher || student)."""
    s, t = torch.from_numpy(student_logits), torch.from_numpy(teacher_logits)  # (N, C) each
    k = min(5, t.shape[1])
    t_top = t.argmax(-1)
    return {
        "agreement": float((s.argmax(-1) == t_top).float().mean()),
        "agreement_top5": float((s.topk(k, dim=-1).indices == t_top[:, None]).any(-1).float().mean()),
        "kl": float(kl_per_sample(s, t).mean()),
    }


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
