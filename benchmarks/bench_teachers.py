"""The packaged teacher ladder (EfficientNet-Lite0, Lite1, Lite2) on data sets: probe top-1 per block and speed.

    python benchmarks/bench_teachers.py                                  # shapes, 2,000 images, last 4 stages
    python benchmarks/bench_teachers.py --data shapes folder:/data/clipart   # and the clip-art set (openclipart.sh)
    python benchmarks/bench_teachers.py --samples 500 --layers 2         # quicker
    python benchmarks/bench_teachers.py --teachers effnet_lite0_imagenet hf:facebook/dinov2-small \\
        --set teacher.checkpoint=/models/dinov2-small                    # any teacher names

Each teacher is extracted through the pipeline (``vitdistill.extract.extract``, with ``teacher.layers``)
into its own cache and probed with the probe stage (``vitdistill.probes.stage.probe_cache``): linear
top-1 of the final embedding, of each cached block, of all blocks side by side, and the best block
(chosen on val). Extraction speed is the pipeline's own measure (images over the seconds spent in the
shard loop: decode, resize, forward, write).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from vitdistill.config import load_config
from vitdistill.data.ingest import resolve_inputs
from vitdistill.extract import extract
from vitdistill.models.teachers import create_teacher
from vitdistill.probes.stage import probe_cache

from _data import data_sets

LADDER = ["effnet_lite0_imagenet", "effnet_lite1_imagenet", "effnet_lite2_imagenet"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teachers", nargs="+", default=LADDER)
    p.add_argument("--data", nargs="+", default=["shapes"],
                   help="one or more of: shapes, folder:PATH (an ImageFolder, e.g. the clip-art set)")
    p.add_argument("--samples", type=int, default=2000, help="shapes: images to generate")
    p.add_argument("--layers", default="4", help="teacher.layers: N last blocks/stages, or a list like [-3,-1]")
    p.add_argument("--set", action="append", default=[], help="extra dotted.key=value overrides")
    args = p.parse_args()
    for spec in args.data:
        ladder(spec, args)


def ladder(spec: str, args: argparse.Namespace) -> None:
    rows, layer_rows = [], []
    with tempfile.TemporaryDirectory() as root:
        for name in args.teachers:
            cfg = load_config(None, [f"cache.root={root}", *data_sets(spec, args.samples),
                                     f"teacher.name={name}", f"teacher.layers={args.layers}",
                                     "probe.fewshot_shots=[10]", "probe.knn_k=[10]", *args.set])
            inputs = resolve_inputs(cfg, progress=False)
            t0 = time.perf_counter()
            plan, manifest = extract(cfg, inputs, progress=False)
            extract_s = time.perf_counter() - t0
            stats = manifest["stats"]
            t0 = time.perf_counter()
            report = probe_cache(plan.cache_dir, cfg.probe)
            probe_s = time.perf_counter() - t0
            m = report.metrics
            teacher = create_teacher(cfg.teacher)
            rows.append({
                "teacher": name,
                "px": teacher.data_config["input_size"][-1],
                "params_M": sum(p.numel() for p in teacher.model.parameters()) / 1e6,
                "img_per_s": stats["samples_extracted"] / stats["extract_seconds"],
                "linear_top1": m["linear_top1"],
                "best_layer": int(m["best_layer"]),
                "best_layer_top1": m["best_layer_linear_top1"],
                "all_layers_top1": m["layers_concat_linear_top1"],
                "knn10_top1": m["knn10_top1"],
                "extract_s": extract_s,
                "probe_s": probe_s,
            })
            layer_rows += [{"teacher": name, **r} for r in report.tables["layers"]]
            print(f"done {name}: {report.headline} ({extract_s:.0f} s extract, {probe_s:.0f} s probes)", flush=True)

    n = manifest["num_samples"]
    print(f"\n{spec}, {n} images, teacher.layers={args.layers}; test split {report.split_sizes['test']} images")
    print("| teacher | input px | params | extract img/s | linear top-1 (embedding) | best layer | its top-1 "
          "| all layers top-1 | kNN@10 top-1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['teacher']}` | {r['px']} | {r['params_M']:.2f}M | {r['img_per_s']:.0f} | {r['linear_top1']:.3f} "
              f"| {r['best_layer']} | {r['best_layer_top1']:.3f} | {r['all_layers_top1']:.3f} | {r['knn10_top1']:.3f} |")
    print("\nper block (linear probe; val picks the best):")
    print("| teacher | block | dim | val top-1 | test top-1 |")
    print("|---|---|---|---|---|")
    for r in layer_rows:
        print(f"| `{r['teacher']}` | {r['layer']} | {r['dim']} | {r['val_top1']:.3f} | {r['test_top1']:.3f} |")


if __name__ == "__main__":
    main()
