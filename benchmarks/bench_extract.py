"""Extraction benchmark: the pipeline against a bare ``teacher(x)`` loop, and warm against cold.

    python benchmarks/bench_extract.py                 # digits through the packaged teacher
    python benchmarks/bench_extract.py --images 1024 --batch-size 32 --threads 2

Measured side by side in one run, with the same teacher, batch size and torch threads:

1. bare: the teacher over preloaded, already-preprocessed tensors (no decode, no I/O, no writes);
2. cold: ``extract()`` into an empty cache (decode + preprocess + forward + shard writes + hashes);
3. warm: the same ``extract()`` again over the finished cache (resume check only).

The three run interleaved for ``--rounds`` rounds and the medians are reported, so that drift on a
shared machine hits both sides of each ratio.

Prints pipeline/bare throughput (target >= 0.9) and warm/cold time (target <= 0.05). On a CUDA
machine it also measures a ViT-B/16 teacher in bf16: images/s and model FLOPs utilisation.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import tempfile
import time

import torch
from PIL import Image

from vitdistill.cache import fs
from vitdistill.cache.tario import iter_tar_samples
from vitdistill.config import load_config
from vitdistill.data.ingest import resolve_inputs
from vitdistill.extract import extract
from vitdistill.models.teachers import create_teacher

# Dense bf16 tensor-core peaks (FLOP/s) for the MFU denominator.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def preload(inputs, teacher) -> torch.Tensor:
    transform = teacher.transform()
    xs = []
    for url in inputs.shards:
        with fs.open_read(url) as f:
            for _, fields in iter_tar_samples(f, url):
                img = Image.open(io.BytesIO(fields["png"])).convert("RGB")
                xs.append(transform(img))
    return torch.stack(xs)


def bare_loop(teacher, x: torch.Tensor, batch_size: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(x), batch_size):
        teacher(x[i : i + batch_size])
    return len(x) / (time.perf_counter() - t0)


def cpu_section(args) -> None:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        sets = [
            f"cache.root={root}",
            f"data.limit={args.images}",
            f"data.shard_samples={args.shard_samples}",
            f"teacher.name={args.teacher}",
            f"teacher.batch_size={args.batch_size}",
            f"teacher.threads={args.threads}",
        ]
        cfg = load_config(None, sets)
        inputs = resolve_inputs(cfg, progress=False)
        teacher = create_teacher(cfg.teacher)
        x = preload(inputs, teacher)
        bare_loop(teacher, x[: args.batch_size], args.batch_size)  # warm-up (allocator, kernels)
        rows = []
        for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits both sides
            bare = bare_loop(teacher, x, args.batch_size)
            shutil.rmtree(os.path.join(root, "features"), ignore_errors=True)
            t0 = time.perf_counter()
            extract(cfg, inputs, progress=False)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            _, manifest = extract(cfg, inputs, progress=False)
            warm = time.perf_counter() - t0
            assert manifest["stats"]["shards_reused"] == len(inputs.shards)
            rows.append((bare, args.images / cold, cold, warm))
    print(f"teacher={args.teacher} images={args.images} batch={args.batch_size} threads={args.threads} "
          f"shards={len(inputs.shards)} rounds={args.rounds}")
    print(f"{'round':<7}{'bare img/s':>12}{'pipeline img/s':>16}{'ratio':>8}{'cold s':>9}{'warm s':>9}{'warm/cold':>11}")
    for i, (bare, pipe, cold, warm) in enumerate(rows):
        print(f"{i:<7}{bare:>12.1f}{pipe:>16.1f}{pipe / bare:>8.3f}{cold:>9.2f}{warm:>9.3f}{warm / cold:>11.4f}")
    med = lambda v: statistics.median(v)  # noqa: E731
    ratio = med([p / b for b, p, _, _ in rows])
    warm_cold = med([w / c for _, _, c, w in rows])
    print(f"median pipeline/bare throughput: {ratio:.3f} (target >= 0.90)")
    print(f"median warm/cold time:           {warm_cold:.4f} (target <= 0.05)")


def gpu_section(args) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from vitdistill.config import TeacherConfig

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    t = create_teacher(TeacherConfig(name="vit_base_patch16_224", pretrained=False, device="cuda", precision="bf16"))
    bs = args.gpu_batch_size
    x = torch.randn(bs, 3, 224, 224, device="cuda")
    with FlopCounterMode(display=False) as counter:
        t(x[:1])
    flops_per_image = counter.get_total_flops()
    for _ in range(3):
        t(x)
    torch.cuda.synchronize()
    iters = 20
    t0 = time.perf_counter()
    for _ in range(iters):
        t(x)
    torch.cuda.synchronize()
    ips = iters * bs / (time.perf_counter() - t0)
    print(f"\nGPU {name}: ViT-B/16 bf16 batch {bs}: {ips:,.0f} img/s, {flops_per_image / 1e9:.1f} GFLOP/img, "
          f"{ips * flops_per_image / 1e12:.1f} TFLOP/s" + (f", MFU {ips * flops_per_image / peak:.1%}" if peak else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="effnet_lite0_imagenet")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--shard-samples", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gpu-batch-size", type=int, default=256)
    args = p.parse_args()
    cpu_section(args)
    if torch.cuda.is_available():
        gpu_section(args)
    else:
        print("\nno CUDA device: GPU images/s and MFU not measured")


if __name__ == "__main__":
    main()
