"""Probe accuracy on the real packaged teacher against the same architecture randomly initialised.

    python benchmarks/bench_probe_teachers.py                    # digits (1,797) and shapes (2,000)
    python benchmarks/bench_probe_teachers.py --datasets digits --shapes-samples 1000

The ViT-22B question in miniature: how much do pretrained frozen features buy over random ones?
Both teachers are EfficientNet-Lite0 (``effnet_lite0_imagenet`` with ``pretrained`` true/false),
extracted through the pipeline into separate caches and probed with the same protocol.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from vitdistill.config import load_config
from vitdistill.data.ingest import resolve_inputs
from vitdistill.extract import extract
from vitdistill.probes.stage import probe_cache

COLUMNS = ("linear_top1", "linear_mean_per_class_recall", "fewshot_10shot_top1", "knn10_top1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=["digits", "shapes"])
    p.add_argument("--shapes-samples", type=int, default=2000)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for dataset in args.datasets:
            for pretrained in (True, False):
                cfg = load_config(None, [f"cache.root={root}", f"data.source={dataset}",
                                         f"data.num_samples={args.shapes_samples}", f"teacher.pretrained={pretrained}",
                                         "probe.fewshot_shots=[1,5,10,25]"])
                t0 = time.perf_counter()
                plan, _ = extract(cfg, resolve_inputs(cfg, progress=False), progress=False)
                report = probe_cache(plan.cache_dir, cfg.probe)
                rows.append((dataset, "packaged ImageNet" if pretrained else "random init", report.metrics,
                             time.perf_counter() - t0))
    chance = {"digits": 0.1, "shapes": 1 / 6}
    print(f"{'dataset':<8}{'teacher':<19}" + "".join(f"{c:>30}" for c in COLUMNS) + f"{'seconds':>9}")
    for dataset, teacher, m, secs in rows:
        print(f"{dataset:<8}{teacher:<19}" + "".join(f"{m[c]:>30.3f}" for c in COLUMNS) + f"{secs:>9.1f}")
    for dataset in args.datasets:
        real, rand = (r[2] for r in rows if r[0] == dataset)
        print(f"{dataset}: linear top-1 real/random = {real['linear_top1'] / rand['linear_top1']:.2f}x "
              f"(+{100 * (real['linear_top1'] - rand['linear_top1']):.1f} points; chance {chance.get(dataset, 0):.3f})")


if __name__ == "__main__":
    main()
