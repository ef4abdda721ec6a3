"""Distillation: a frozen teacher into a small student, online or from a cache of teacher views.

    from vitdistill.distill import run_distill
    report = run_distill(cfg)        # DistillReport: metrics, history, figures, headline, model

The parts compose on their own: students (:func:`create_student`), loss modules returning dicts
of named losses (:func:`create_distill_loss`), deterministic views (:mod:`.views`), the FKD view
cache (:func:`build_view_cache`), and evaluators; training runs through the shared
:class:`vitdistill.trainer.Trainer` (re-exported here).
"""

from vitdistill.distill.errors import DistillError
from vitdistill.distill.losses import LOSSES, DistillLoss, create_distill_loss, kd_kl, list_losses
from vitdistill.distill.stage import DistillReport, run_distill
from vitdistill.distill.students import STUDENTS, ParallelBlock, Student, create_student, list_students
from vitdistill.distill.viewcache import build_view_cache
from vitdistill.trainer import Callback, Trainer, TrainerConfig, TrainResult

__all__ = [
    "LOSSES", "STUDENTS", "Callback", "DistillError", "DistillLoss", "DistillReport", "ParallelBlock", "Student",
    "TrainResult", "Trainer", "TrainerConfig", "build_view_cache", "create_distill_loss",
    "create_student", "kd_kl", "list_losses", "list_students", "run_distill",
]
