"""Distillation benchmark: cached (FKD) vs online epoch time, and distilled vs labels-only students.

    .venv/bin/python benchmarks/bench_distill.py                    # all 1,797 digits, default teacher
    .venv/bin/python benchmarks/bench_distill.py --limit 300 --set teacher.name=test_vit --set teacher.pretrained=false

1. Speed, measured side by side in one process over the same views (epoch 0, so the online
   views are exactly the cached view 0): one training epoch online, one cached, and the
   teacher's forward passes alone on those views. Removing the teacher ideally turns the online
   epoch into ``online - teacher``; the target is at least 90% of that ideal speedup:
   ``achieved / ideal = (online / cached) / (online / (online - teacher))``.
2. Accuracy with the same budget (epochs, views, student, seed): the distilled student against
   the same student trained on the labels alone (``alpha=1``, no distillation terms).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from vitdistill.config import load_config  # noqa: E402
from vitdistill.data.ingest import resolve_inputs  # noqa: E402
from vitdistill.distill import Trainer, TrainerConfig, create_distill_loss, run_distill  # noqa: E402
from vitdistill.data.shards import SplitRule, index_shards  # noqa: E402
from vitdistill.distill.data import StreamBatches, num_classes  # noqa: E402
from vitdistill.distill.stage import build_student, student_spec  # noqa: E402
from vitdistill.distill.viewcache import build_view_cache, teacher_spec  # noqa: E402
from vitdistill.models.teachers import create_teacher  # noqa: E402


def one_epoch(cfg, data, teacher, num_classes) -> float:
    """Seconds of one training epoch of a fresh student over ``data`` (batches made inside the loop)."""
    d = cfg.distill
    student = build_student(cfg, teacher, num_classes)
    loss_fn = create_distill_loss(d.alpha, d.losses, d.temperature)
    t0 = time.perf_counter()
    Trainer(student, loss_fn, data, TrainerConfig(epochs=1, lr=d.lr, grad_clip=d.grad_clip)).fit()
    return time.perf_counter() - t0


def teacher_only(online: StreamBatches) -> float:
    """Seconds of the teacher's forward passes alone on epoch 0's views (inputs rendered beforehand)."""
    total = 0.0
    for batch in online.stream.batches(0, num_workers=online.num_workers):
        t0 = time.perf_counter()
        online.teacher(batch["teacher_input"])
        total += time.perf_counter() - t0
    return total


def speed(cfg, rounds: int) -> dict[str, float]:
    d = cfg.distill
    inputs = resolve_inputs(cfg, progress=False)
    t0 = time.perf_counter()
    plan, manifest = build_view_cache(cfg, inputs, progress=False)
    cache_s = time.perf_counter() - t0
    rule = SplitRule.from_config(cfg.data)
    index = index_shards(inputs.shards, rule, cfg.data.on_error, inputs.fingerprint, cfg.cache.root)
    teacher = create_teacher(cfg.teacher)
    n_classes = num_classes(inputs, index)
    sspec = student_spec(build_student(cfg, teacher, n_classes))
    tspec = teacher_spec(teacher, d.teacher_size)
    online = StreamBatches.online(inputs, index, rule, d, cfg.data.on_error, sspec, teacher, tspec)
    cached = StreamBatches.cached(inputs, plan.cache_dir, manifest, rule, d, cfg.data.on_error, sspec)
    one_epoch(cfg, cached, teacher, n_classes)  # warm-up: allocator, thread pools
    times = {"online": [], "cached": [], "teacher": []}
    for _ in range(rounds):  # interleaved, so drifting machine load hits all three alike
        times["online"].append(one_epoch(cfg, online, teacher, n_classes))
        times["cached"].append(one_epoch(cfg, cached, teacher, n_classes))
        times["teacher"].append(teacher_only(online))
    best = {k: min(v) for k, v in times.items()}
    ideal = best["online"] / max(1e-9, best["online"] - best["teacher"])
    achieved = best["online"] / best["cached"]
    return {"train_images": index.total("train"), "teacher_side": tspec.size, "student_side": sspec.size,
            "cache_build_s": cache_s, "cache_reused": manifest["stats"]["shards_built"] == 0,
            "online_epoch_s": best["online"], "cached_epoch_s": best["cached"], "teacher_forward_s": best["teacher"],
            "achieved_speedup": achieved, "ideal_speedup": ideal, "fraction_of_ideal": achieved / ideal}


def accuracy(cfg, sets: list[str], root: str) -> dict[str, dict[str, float]]:
    base = [f"cache.root={root}", "distill.resume=false", *sets]
    distilled = run_distill(load_config(None, base), progress=False)
    labels = run_distill(load_config(None, base + ["distill.alpha=1.0", "distill.losses={}"]), progress=False)
    keys = ("student_top1", "student_probe_top1", "agreement", "train_seconds")
    return {name: {k: r.metrics[k] for k in keys if k in r.metrics} | {"teacher_top1": r.metrics.get("teacher_top1")}
            for name, r in (("distilled", distilled), ("labels_only", labels))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="digits to use (default: all 1,797)")
    ap.add_argument("--rounds", type=int, default=2, help="timed epochs per mode; the fastest counts")
    ap.add_argument("--cache-root", default=None, help="default: a fresh temporary directory")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--set", action="append", default=[], dest="sets", help="config override, e.g. distill.epochs=10")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    root = args.cache_root or tempfile.mkdtemp(prefix="bench-distill-")
    sets = ([f"data.limit={args.limit}"] if args.limit else []) + args.sets
    cfg = load_config(None, [f"cache.root={root}", *sets])
    print(f"torch threads {torch.get_num_threads()}, teacher {cfg.teacher.name}, student {cfg.student.name}, "
          f"views {cfg.distill.num_views}, cache {root}")

    s = speed(cfg, args.rounds)
    print(f"\n== cached vs online, one epoch over {s['train_images']} training views "
          f"(teacher at {s['teacher_side']} px, student at {s['student_side']} px)")
    print(f"view cache build      {s['cache_build_s']:7.2f} s{' (reused)' if s['cache_reused'] else ''}")
    print(f"online epoch          {s['online_epoch_s']:7.2f} s")
    print(f"cached epoch          {s['cached_epoch_s']:7.2f} s")
    print(f"teacher forward alone {s['teacher_forward_s']:7.2f} s")
    print(f"speedup achieved {s['achieved_speedup']:.2f}x / ideal {s['ideal_speedup']:.2f}x = "
          f"{s['fraction_of_ideal']:.1%} of ideal (target >= 90%)")

    if not args.skip_accuracy:
        acc = accuracy(cfg, sets, root)
        print(f"\n== same budget ({cfg.distill.epochs} epochs, {cfg.distill.mode}, {cfg.distill.num_views} views): "
              "distilled vs labels only, test split")
        for name, m in acc.items():
            print(f"{name:12s} " + ", ".join(f"{k} {v:.3f}" for k, v in m.items() if v is not None))
        d, lab = acc["distilled"]["student_top1"], acc["labels_only"]["student_top1"]
        print(f"distilled - labels only: {d - lab:+.3f} top-1")


if __name__ == "__main__":
    main()
