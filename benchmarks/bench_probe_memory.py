"""Peak resident memory of the probes on a spilled (memory-mapped float16) cache vs the cache loaded in memory.

    python benchmarks/bench_probe_memory.py                          # N = 20,000 and 80,000, D = 384
    python benchmarks/bench_probe_memory.py --sizes 5000,20000 --dim 256

A synthetic feature cache per size (class means plus noise, float16 embeddings, split 70/10/20) is
written with the extractor's shard writer (``TarShardWriter``). Each (size, mode) then runs in a
fresh process, so its peak RSS (``ru_maxrss``) is its own:

- ``imports``: torch and vitdistill imported, nothing read (the floor every mode pays);
- ``stream/memory`` and ``stream/spilled``: few-shot and kNN on ``fc.load()``'s float32 arrays, and on
  ``fc.load(spill_dir=...)``'s float16 memory maps;
- ``probe/memory``: every probe (linear, few-shot, kNN) on the in-memory arrays; ``probe/spilled``:
  ``probe_cache`` itself, which spills. The linear probe holds its train + val rows by nature (float32,
  then float64 for the refit), so it grows with N either way.

Printed: peak RSS and its growth above ``imports``, beside the size of the N x D features in float32.
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
MODES = ("imports", "stream/memory", "stream/spilled", "probe/memory", "probe/spilled")
SHARD = 10_000


def write_cache(root: str, n: int, dim: int, num_classes: int, seed: int = 0) -> str:
    """A float16 feature cache of ``n`` samples in shards of SHARD, written as the extractor writes them."""
    import numpy as np

    from vitdistill.cache.tario import TarShardWriter, dump_npy

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, dim)) * 0.15  # (C, D): overlapping classes, so no probe is perfect
    split_of = ["train"] * 7 + ["val"] + ["test"] * 2
    shards, counts = [], dict.fromkeys(("train", "val", "test"), 0)
    for s, start in enumerate(range(0, n, SHARD)):
        m = min(SHARD, n - start)
        cls = rng.integers(num_classes, size=m)
        emb = (means[cls] + rng.normal(size=(m, dim))).astype(np.float16)  # (m, D)
        name = f"feat-{s:05d}-000.tar"
        w = TarShardWriter(os.path.join(root, name))
        for i in range(m):
            split = split_of[(start + i) % 10]
            counts[split] += 1
            w.write(f"s{start + i:07d}", {"emb.npy": dump_npy(emb[i]), "cls": str(int(cls[i])).encode(),
                                          "split.txt": split.encode()})
        w.close()
        shards.append({"name": name, "count": m})
    manifest = {"kind": "features", "shards": shards, "teacher": {"name": "synthetic", "num_features": dim},
                "num_samples": n, "dtype": "float16", "classes": [f"c{c}" for c in range(num_classes)],
                "split": {"counts": counts}, "dataset": {"source": "synthetic"}}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return root


def child(mode: str, cache: str) -> None:
    sys.path.insert(0, str(ROOT))
    from vitdistill.cache.reader import FeatureCache
    from vitdistill.config import ProbeConfig
    from vitdistill.probes import fewshot_probe, knn_probe, linear_probe
    from vitdistill.probes.stage import probe_cache

    cfg = ProbeConfig(fewshot_seeds=[0])
    fc = FeatureCache.open(cache)
    info: dict = {}
    t0 = time.perf_counter()
    if mode == "probe/spilled":
        info["linear_top1"] = probe_cache(cache, cfg).metrics["linear_top1"]
    elif mode != "imports":
        with tempfile.TemporaryDirectory() as spill:
            loaded = [fc.load(s, spill_dir=spill if mode.endswith("spilled") else None) for s in ("train", "val", "test")]
            (xtr, ytr), (xva, yva), (xte, yte) = [(d["emb"], d["cls"]) for d in loaded]
            c = len(fc.classes)
            if mode == "probe/memory":
                info["linear_top1"] = linear_probe(xtr, ytr, xva, yva, xte, yte, num_classes=c).top1
            few = fewshot_probe(xtr, ytr, xva, yva, xte, yte, shots=tuple(cfg.fewshot_shots), seeds=(0,), num_classes=c)
            knn = knn_probe(xtr, ytr, xte, yte, ks=tuple(cfg.knn_k), num_classes=c)
            info["knn10_top1"], info["25shot_top1"] = knn.top1[10], few.mean_top1.get(25)
    info["seconds"] = time.perf_counter() - t0
    info["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    print(json.dumps(info))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="20000,80000")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--root", default=None, help="where the caches go (default: a temporary directory)")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "CACHE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    sys.path.insert(0, str(ROOT))
    root = args.root or tempfile.mkdtemp(prefix="bench-probe-memory-")
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[tuple[int, str], dict] = {}
    for n in sizes:
        cache = os.path.join(root, f"cache-{n}")
        if not os.path.exists(os.path.join(cache, "manifest.json")):
            write_cache(cache, n, args.dim, args.classes)
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--child", mode, cache], check=True, capture_output=True,
                                 text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            results[(n, mode)] = r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  N={n:>7,} {mode:15s} peak RSS {r['rss_mb']:7.0f} MiB, {r['seconds']:6.1f} s  "
                  + json.dumps({k: v for k, v in r.items() if k not in ("rss_mb", "seconds")}), flush=True)
    print(f"\nD = {args.dim}, C = {args.classes}; MiB of peak RSS (growth above `imports` in brackets)")
    print("| mode | " + " | ".join(f"N={n:,} (features {n * args.dim * 4 / 2**20:.0f} MiB f32)" for n in sizes)
          + " | growth spilled / in memory |")
    print("|---|" + "---|" * (len(sizes) + 1))
    for mode in MODES:
        cells = []
        for n in sizes:
            base = results[(n, "imports")]["rss_mb"]
            cells.append(f"{results[(n, mode)]['rss_mb']:.0f} (+{results[(n, mode)]['rss_mb'] - base:.0f})")
        ratio = ""
        if mode.endswith("spilled"):
            twin, n = mode.replace("spilled", "memory"), sizes[-1]
            base = results[(n, "imports")]["rss_mb"]
            grow = (results[(n, mode)]["rss_mb"] - base) / max(1.0, results[(n, twin)]["rss_mb"] - base)
            ratio = f"{grow:.2f} at N={n:,}"
        print(f"| {mode} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    main()
