"""LiT benchmark: training from cached image features against running the locked image tower online.

    python benchmarks/bench_lit.py                                  # 1000 shapes, default LiT config
    python benchmarks/bench_lit.py --source digits --threads 2
    python benchmarks/bench_lit.py --set text_tower=scratch --set loss=sigmoid

Measured side by side in one run, on the same training samples, batches, model and loss:

1. cached: one LiT epoch whose image embeddings are read from the feature cache (the stage's loop);
2. online: the same epoch with the frozen teacher run each step, as a LiT trainer without a cache
   would: decode the ingested image shards, the teacher's PIL transform, ``normalize_uint8`` and a
   forward pass, then the identical contrastive step.

The two alternate for ``--rounds`` rounds and the medians are reported, so drift on a shared
machine hits both sides of the ratio. The one-off extraction that builds the cache is reported
too, with the number of epochs after which it has paid for itself. Then the full stage
(``run_lit``) runs with the given config and its zero-shot top-1 is set against chance.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from vitdistill.config import LitConfig, TeacherConfig, load_config
from vitdistill.data.shards import decode_image, read_shard
from vitdistill.data.ingest import resolve_inputs
from vitdistill.extract import extract
from vitdistill.lit.data import load_lit_data
from vitdistill.lit.stage import build_lit_model, run_lit
from vitdistill.lit.train import LitObjective, TextFeatures, batch_loss, lit_parts, trainer_config
from vitdistill.models.teachers import create_teacher
from vitdistill.trainer import create_optimizer


def step(model, loss_fn, feats, opt, emb: torch.Tensor, text_ids: torch.Tensor, groups: torch.Tensor) -> None:
    out = batch_loss(model, loss_fn, feats, emb, text_ids, groups)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    opt.step()


def cached_epoch(model, loss_fn, feats, opt, data, batch_size: int) -> float:
    emb, ids = torch.from_numpy(data.train.embeddings()), torch.from_numpy(data.train.options[:, 0])
    groups = torch.from_numpy(data.text_groups)
    t0 = time.perf_counter()
    for i in range(0, len(emb), batch_size):
        step(model, loss_fn, feats, opt, emb[i:i + batch_size], ids[i:i + batch_size], groups)
    return time.perf_counter() - t0


def online_epoch(model, loss_fn, feats, opt, data, shards: list[str], teacher, batch_size: int) -> float:
    """Stream the image shards; keep training samples; teacher forward + the same step per batch."""
    text_of = dict(zip(data.train.keys, data.train.options[:, 0].tolist()))
    groups = torch.from_numpy(data.text_groups)
    transform = teacher.pil_transform()
    pixels: list[np.ndarray] = []
    ids: list[int] = []

    def flush() -> None:
        emb, _ = teacher(teacher.normalize_uint8(torch.from_numpy(np.stack(pixels))))  # (B, D), inference mode
        emb = emb.clone()  # an inference tensor cannot enter autograd; the locked tower needs no grad anyway
        step(model, loss_fn, feats, opt, emb, torch.tensor(ids), groups)
        pixels.clear()
        ids.clear()

    t0 = time.perf_counter()
    for url in shards:
        for key, fields in read_shard(url):
            if key not in text_of:
                continue
            pixels.append(decode_image(key, fields, url, transform))
            ids.append(text_of[key])
            if len(ids) == batch_size:
                flush()
    if ids:
        flush()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="shapes", choices=["shapes", "digits"])
    ap.add_argument("--num-samples", type=int, default=1000, help="images to generate (shapes)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating cached/online epoch pairs")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    ap.add_argument("--root", default=None, help="cache root (default: a temporary directory)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="LitConfig field override")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.root or tempfile.mkdtemp(prefix="bench-lit-")
    cfg = load_config(None, [f"cache.root={root}", f"data.source={args.source}",
                             f"data.num_samples={args.num_samples}"] + [f"lit.{s}" for s in args.set])
    lit: LitConfig = cfg.lit

    inputs = resolve_inputs(cfg, progress=False)
    t0 = time.perf_counter()
    plan, manifest = extract(cfg, inputs, progress=False)
    extract_s = time.perf_counter() - t0

    data = load_lit_data(plan.cache_dir, holdout_combos=lit.holdout_combos)
    model, loss_fn = build_lit_model(lit, data)
    frozen = model.text_tower.pretrained and lit.freeze_text
    feats = TextFeatures(model, data.texts, frozen)
    objective = LitObjective(model, loss_fn, feats, torch.from_numpy(data.text_groups), frozen)
    opt = create_optimizer(lit_parts(objective, lit), trainer_config(lit))
    model.train()
    teacher = create_teacher(TeacherConfig())
    cached, online = [], []
    cached_epoch(model, loss_fn, feats, opt, data, lit.batch_size)  # warm-up: first-call costs
    for _ in range(args.rounds):
        cached.append(cached_epoch(model, loss_fn, feats, opt, data, lit.batch_size))
        online.append(online_epoch(model, loss_fn, feats, opt, data, inputs.shards, teacher, lit.batch_size))
    c, o = statistics.median(cached), statistics.median(online)

    report = run_lit(plan.cache_dir, lit, progress=False)
    m = report.metrics
    n = len(data.train)
    print(f"\nLiT on {args.source}: {n} training images, teacher {plan.teacher['name']}, text tower "
          f"{lit.text_tower}{' (frozen)' if frozen else ''}, loss {lit.loss}, batch {lit.batch_size}, "
          f"torch threads {torch.get_num_threads()}, median of {args.rounds} rounds\n")
    rows = [
        ("epoch, cached features", f"{c:8.3f} s", f"{n / c:10.0f} img/s", ""),
        ("epoch, teacher online", f"{o:8.3f} s", f"{n / o:10.0f} img/s", f"cached is {o / c:.0f}x faster"),
        ("one-off extraction", f"{extract_s:8.3f} s", f"{manifest['num_samples'] / extract_s:10.0f} img/s",
         f"pays off after {extract_s / max(o - c, 1e-9):.1f} epochs"),
        ("LiT stage (run_lit)", f"{m['train_seconds']:8.3f} s", f"{lit.epochs:>6d} epochs", ""),
        ("zero-shot top-1", f"{m['zeroshot_top1']:10.3f}", f"chance {m['chance_top1']:.3f}",
         f"{m['zeroshot_top1'] / m['chance_top1']:.1f}x chance"),
    ]
    if "heldout_zeroshot_top1" in m:
        rows.append(("  held-out combos", f"{m['heldout_zeroshot_top1']:10.3f}", f"chance {m['chance_top1']:.3f}",
                     f"{m['heldout_zeroshot_top1'] / m['chance_top1']:.1f}x chance"))
    rows.append(("retrieval R@1 i2t / t2i", f"{m['retrieval_i2t_r1']:10.3f}", f"{m['retrieval_t2i_r1']:10.3f}",
                 f"over {int(m['retrieval_texts'])} distinct texts"))
    for r in rows:
        print(f"{r[0]:<26}{r[1]:>12}  {r[2]:>16}  {r[3]}")
    print(f"\n{report.headline}")


if __name__ == "__main__":
    main()
