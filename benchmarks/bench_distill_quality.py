"""Does the student learn from the teacher? Distillation recipes against labels alone, at one budget.

    python benchmarks/bench_distill_quality.py --data shapes
    python benchmarks/bench_distill_quality.py --data folder:/data/clipart      # ../shared/data/openclipart.sh
    python benchmarks/bench_distill_quality.py --data folder:/data/clipart --recipes funmatch --epochs 60

Every number comes from this one run, on the data's test split: the teacher's linear probe (the probe
stage's), the same student trained on labels only, and the student distilled under each recipe of
``configs/distill/`` at the same budget (epochs x training images). "gap closed" is
(student - labels only) / (teacher - labels only). The data-efficiency rows use a fixed share of the
training labels: labels only on that share, against a function-matching student distilled without
labels whose head is a probe fitted on that share.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

from vitdistill.config import load_config  # noqa: E402
from vitdistill.data.ingest import resolve_inputs  # noqa: E402
from vitdistill.data.shards import SplitRule, index_shards  # noqa: E402
from vitdistill.distill import run_distill  # noqa: E402
from vitdistill.distill.stage import evaluate_distill  # noqa: E402
from vitdistill.extract import extract  # noqa: E402
from vitdistill.models.teachers import create_teacher  # noqa: E402
from vitdistill.probes.stage import probe_cache  # noqa: E402

from _data import data_sets  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="shapes", help="shapes, or folder:PATH (an ImageFolder, e.g. the clip-art set)")
    ap.add_argument("--num-samples", type=int, default=2000, help="shapes: images to generate")
    ap.add_argument("--recipes", default="funmatch,fkd,deit", help="comma-separated files of configs/distill/")
    ap.add_argument("--epochs", type=int, default=30, help="the one budget: epochs over the training split")
    ap.add_argument("--views", type=int, default=None, help="cached views per image (default: the recipe's)")
    ap.add_argument("--label-fraction", type=float, default=0.1, help="data-efficiency rows: share of labels")
    ap.add_argument("--patience", default="", help="comma-separated epoch counts: function matching and labels "
                    "only at each (the views are reused), to show how quality grows with the schedule")
    ap.add_argument("--labels-only-top1", type=float, default=None, help="skip the labels-only run and use this "
                    "top-1 for the gap (from another run of this script with the same data and budget)")
    ap.add_argument("--cache-root", default=None, help="default: a fresh temporary directory")
    ap.add_argument("--set", action="append", default=[], dest="sets", help="extra override for every run")
    args = ap.parse_args()
    root = args.cache_root or tempfile.mkdtemp(prefix="bench-quality-")
    base = [f"cache.root={root}", "distill.resume=false", "distill.register_as=null", *data_sets(args.data, args.num_samples),
            f"distill.epochs={args.epochs}", *args.sets]
    cfg = load_config(None, base)
    inputs = resolve_inputs(cfg, progress=False)
    index = index_shards(inputs.shards, SplitRule.from_config(cfg.data), cfg.data.on_error, inputs.fingerprint,
                         cfg.cache.root)
    print(f"data {args.data}: train {index.total('train')}, val {index.total('val')}, test {index.total('test')}; "
          f"teacher {cfg.teacher.name}, student {cfg.student.name}, {args.epochs} epochs; cache {root}")

    t0 = time.perf_counter()
    plan, _ = extract(cfg, inputs, progress=False)
    teacher_top1 = probe_cache(plan.cache_dir, cfg.probe).metrics["linear_top1"]
    print(f"teacher linear probe  {teacher_top1:.3f}  ({time.perf_counter() - t0:.0f} s with extraction)")

    rows: list[tuple[str, dict]] = []

    def run(name: str, files: list[str], sets: list[str]) -> dict:
        c = load_config(files or None, base + sets)
        t = time.perf_counter()
        r = run_distill(c, progress=False)
        m = {**r.metrics, "wall_s": time.perf_counter() - t, "_model": r.model, "_cfg": c}
        rows.append((name, m))
        print(f"{name:28s} top-1 {m['student_top1']:.3f}  train {m['train_seconds']:.0f} s, wall {m['wall_s']:.0f} s",
              flush=True)
        return m

    if args.labels_only_top1 is None:
        labels = run("labels only", [], ["distill.alpha=1.0", "distill.losses={}"])
    else:
        labels = {"student_top1": args.labels_only_top1, "train_seconds": float("nan")}
        rows.append(("labels only (given)", labels))
    recipes = {}
    for name in [r for r in args.recipes.split(",") if r]:
        views = [f"distill.num_views={args.views}"] if args.views else []
        recipes[name] = run(f"distilled: {name}", [str(ROOT / "configs" / "distill" / f"{name}.yaml")],
                            [f"distill.epochs={args.epochs}", *views])

    gap = teacher_top1 - labels["student_top1"]
    print(f"\n== {args.data}, {args.epochs} epochs x {index.total('train')} training images, test top-1")
    print("| model | top-1 | gap closed | train s |\n|---|---|---|---|")
    print(f"| teacher (linear probe) | {teacher_top1:.3f} | | |")
    for name, m in rows:
        closed = (m["student_top1"] - labels["student_top1"]) / gap if gap > 0 else float("nan")
        print(f"| {name} | {m['student_top1']:.3f} | {'' if m is labels else f'{closed:.0%}'} | "
              f"{m['train_seconds']:.0f} |")

    if args.patience:
        print("\n== patience: test top-1 against the schedule (function matching reuses its stored views)")
        print("| epochs | labels only | function matching | gap closed |\n|---|---|---|---|")
        views = [f"distill.num_views={args.views}"] if args.views else []
        for e in [int(x) for x in args.patience.split(",")]:
            lab = run(f"labels only, {e} epochs", [], ["distill.alpha=1.0", "distill.losses={}", f"distill.epochs={e}"])
            fm = run(f"funmatch, {e} epochs", [str(ROOT / "configs" / "distill" / "funmatch.yaml")],
                     [f"distill.epochs={e}", *views])
            closed = (fm["student_top1"] - lab["student_top1"]) / max(1e-9, teacher_top1 - lab["student_top1"])
            print(f"| {e} | {lab['student_top1']:.3f} | {fm['student_top1']:.3f} | {closed:.0%} |", flush=True)

    if "funmatch" in recipes:  # data efficiency: the funmatch student never saw a label; only its head does
        f = args.label_fraction
        few = run(f"labels only, {f:.0%} labels", [], ["distill.alpha=1.0", "distill.losses={}",
                                                        f"distill.label_fraction={f}"])
        fm = recipes["funmatch"]
        c = fm["_cfg"].model_copy(update={"distill": fm["_cfg"].distill.model_copy(update={"label_fraction": f})})
        m = evaluate_distill(c, fm["_model"], create_teacher(c.teacher), inputs, index)
        print(f"\n== data efficiency ({f:.0%} of the {index.total('train')} training labels)")
        print("| labels | labels only | function matching (no labels in training, probe head) |\n|---|---|---|")
        print(f"| {f:.0%} | {few['student_top1']:.3f} | {m['student_top1']:.3f} ({int(m['head_labels'])} labels) |")
        print(f"| 100% | {labels['student_top1']:.3f} | {fm['student_top1']:.3f} |")
        verdict = "beats" if m["student_top1"] > labels["student_top1"] else "does not beat"
        print(f"function matching with {f:.0%} of the labels {verdict} labels only with 100% "
              f"({m['student_top1']:.3f} vs {labels['student_top1']:.3f})")


if __name__ == "__main__":
    main()
