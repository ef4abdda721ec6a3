"""Does every stage stay in bounded memory and constant time per image as the data set grows?

    python benchmarks/bench_scale.py                       # shapes at 2,000, 20,000 and 100,000 images
    python benchmarks/bench_scale.py --sizes 2000,20000    # a quicker look
    python benchmarks/bench_scale.py --root R --stages probe,lit   # re-measure some stages on R's caches

Results are kept in ROOT/results.json, so a later run with ``--stages`` on the same ``--root`` re-measures
those stages (ingestion and extraction are idempotent: a finished cache is not rebuilt) and prints the
table over everything measured there.

Each (size, stage) runs in a fresh process, so its peak RSS (``ru_maxrss``) is that stage's alone. The
stages: ingest (generate + write shards), extract (the teacher over every shard), probe (linear, few-shot,
kNN), lit (one epoch of LiT on the cache, embeddings memory-mapped), distill (cached views, streamed from
the shards through the one reader), evaluate (teacher and student on the test split). Everything is
printed relative to the smallest size. The probes need their
N x D feature arrays by nature: their expected size (float32) is printed beside them.

The teacher is the tiny random ``test_vit`` and the student the 32 px ``vit22b_tiny``, so that 100,000
images run in about 20 minutes on 2 cores; memory and time per image do not depend on that choice.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "extract", "probe", "lit", "distill", "evaluate")


def sets(n: int, root: str) -> list[str]:
    return [f"cache.root={root}", "data.source=shapes", f"data.num_samples={n}", "data.shard_samples=2000",
            "teacher.name=test_vit", "teacher.pretrained=false", "teacher.batch_size=128", "student.img_size=32",
            "distill.mode=cached", "distill.num_views=1", "distill.epochs=1", "distill.batch_size=128",
            "distill.num_workers=1", "distill.register_as=null", "distill.checkpoint_every=0",
            "evaluate.max_images=200", "evaluate.severities=[3]", "evaluate.evaluators=[calibration,robustness]",
            "probe.fewshot_seeds=[0]", "lit.epochs=1", "tracking.uri=sqlite:///" + root + "/mlflow.db"]


def child(stage: str, n: int, root: str) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.path.insert(0, str(ROOT))
    from vitdistill.config import load_config
    from vitdistill.data.ingest import resolve_inputs
    from vitdistill.extract import plan_extraction

    cfg = load_config(None, sets(n, root))
    t0 = time.perf_counter()
    info: dict = {}
    inputs = resolve_inputs(cfg, progress=False)
    if stage == "extract":
        from vitdistill.extract import extract

        t0 = time.perf_counter()
        _, m = extract(cfg, inputs, progress=False)
        info["samples"] = m["num_samples"]
    elif stage == "probe":
        from vitdistill.cache.reader import FeatureCache
        from vitdistill.probes.stage import probe_cache

        plan = plan_extraction(cfg, inputs)
        t0 = time.perf_counter()
        r = probe_cache(plan.cache_dir, cfg.probe)
        fc = FeatureCache.open(plan.cache_dir)
        info["linear_top1"] = r.metrics["linear_top1"]
        info["features_mb"] = fc.num_samples * fc.num_features * 4 / 2**20
    elif stage == "lit":
        from vitdistill.lit.stage import run_lit

        plan = plan_extraction(cfg, inputs)
        t0 = time.perf_counter()
        r = run_lit(plan.cache_dir, cfg.lit, progress=False)
        info["zeroshot_top1"] = r.metrics.get("zeroshot_top1")
    elif stage == "distill":
        from vitdistill.distill import run_distill

        t0 = time.perf_counter()
        r = run_distill(cfg, progress=False)
        info["student_top1"] = r.metrics.get("student_top1")
        info["features_mb"] = n * r.model.num_features * 4 / 2**20  # the student probe's N x D
        import torch

        torch.save(r.model.state_dict(), f"{root}/student-{n}.pt")
    elif stage == "evaluate":
        import torch

        from vitdistill.distill.stage import build_student
        from vitdistill.evaluate.stage import run_evaluate
        from vitdistill.models.teachers import create_teacher

        plan = plan_extraction(cfg, inputs)
        student = build_student(cfg, create_teacher(cfg.teacher), 6)
        student.load_state_dict(torch.load(f"{root}/student-{n}.pt", weights_only=True))  # a trained head
        t0 = time.perf_counter()
        r = run_evaluate(cfg, plan.cache_dir, student)
        info["student_ece"] = r.metrics.get("student/calibration/ece")
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    print(json.dumps({"stage": stage, "n": n, "seconds": seconds, "rss_mb": rss, **info}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,20000,100000")
    ap.add_argument("--root", default=None, help="cache root (default: a temporary directory)")
    ap.add_argument("--stages", default=",".join(STAGES), help="stages to measure (default: all)")
    ap.add_argument("--child", nargs=2, metavar=("STAGE", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="bench-scale-")
    if args.child:
        return child(args.child[0], int(args.child[1]), root)
    sizes = [int(s) for s in args.sizes.split(",")]
    chosen = [s for s in STAGES if s in args.stages.split(",")]
    saved = Path(root) / "results.json"
    results: dict[tuple[str, int], dict] = {}
    if saved.is_file():
        results = {(r["stage"], r["n"]): r for r in json.loads(saved.read_text())}
    print(f"root {root}, load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    for n in sizes:
        for stage in chosen:
            out = subprocess.run([sys.executable, __file__, "--root", root, "--child", stage, str(n)], check=True,
                                 capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[(stage, n)] = r
            saved.write_text(json.dumps(list(results.values()), indent=1))
            print(f"  {stage:9s} N={n:>7,}: {r['seconds']:8.1f} s, {1e3 * r['seconds'] / n:7.3f} ms/img, "
                  f"peak RSS {r['rss_mb']:7.0f} MiB", flush=True)
    base = sizes[0]
    print("\n| stage | " + " | ".join(f"N={n:,}: ms/img, RSS MiB" for n in sizes) + " | time/img ratio | RSS ratio |")
    print("(evaluate: seconds per run, since it reads at most evaluate.max_images test images)")
    print("|---|" + "---|" * (len(sizes) + 2))
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    for stage in [s for s in STAGES if all((s, n) in results for n in sizes)]:
        # evaluation reads at most evaluate.max_images test images whatever N: its time is per run, not per image
        per = (lambda n: 1.0) if stage == "evaluate" else (lambda n: n / 1e3)
        cells = [f"{results[(stage, n)]['seconds'] / per(n):.3f}, {results[(stage, n)]['rss_mb']:.0f}" for n in sizes]
        t = (results[(stage, sizes[-1])]["seconds"] / per(sizes[-1])) / (results[(stage, base)]["seconds"] / per(base))
        m = results[(stage, sizes[-1])]["rss_mb"] / results[(stage, base)]["rss_mb"]
        extra = results[(stage, sizes[-1])].get("features_mb")
        note = f" (N x D features at N={sizes[-1]:,}: {extra:.0f} MiB, exempt)" if extra else ""
        print(f"| {stage} | " + " | ".join(cells) + f" | {t:.2f} | {m:.2f}{note} |")


if __name__ == "__main__":
    main()
