"""The probe stage on real caches: metrics, artifacts, and errors for caches probes cannot use."""

from __future__ import annotations

import numpy as np
import pytest
import webdataset as wds

from vitdistill.cache.reader import FeatureCache
from vitdistill.config import ProbeConfig
from vitdistill.data.ingest import resolve_inputs
from vitdistill.errors import DataError
from vitdistill.extract import extract
from vitdistill.probes.stage import probe_cache
from tests.test_extract import png_bytes


def cache_of(cfg) -> str:
    plan, _ = extract(cfg, resolve_inputs(cfg, progress=False), progress=False)
    return plan.cache_dir


FAST_PROBE = ProbeConfig(fewshot_shots=[1, 5], fewshot_seeds=[0, 1], knn_k=[5])


@pytest.mark.slow
def test_real_teacher_features_probe_well_on_digits(make_cfg):
    cache = cache_of(make_cfg("data.limit=600", fast_teacher=False))
    report = probe_cache(cache, FAST_PROBE)
    m = report.metrics
    assert m["linear_top1"] > 0.85 and m["knn5_top1"] > 0.7 and m["fewshot_5shot_top1"] > 0.5
    assert m["fewshot_5shot_top1"] >= m["fewshot_1shot_top1"] - 0.05
    assert 0 < m["linear_chosen_l2"] and "linear top-1" in report.headline
    assert sum(report.split_sizes.values()) == 600
    assert {r["class"] for r in report.tables["per_class"]} == {str(i) for i in range(10)}
    assert sum(r["chosen"] for r in report.tables["linear_sweep"]) == 1
    assert len(report.tables["linear_sweep"]) >= 8
    assert report.figures()["confusion.png"].axes
    import json

    json.dumps(report.to_dict())  # results persist as JSON (Prefect cache), never pickle


def test_cache_without_labels_is_a_clear_error(make_cfg, tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    with wds.TarWriter(str(d / "nolabel.tar")) as w:
        for i in range(40):
            w.write({"__key__": f"u{i:03d}", "png": png_bytes(i)})
    cache = cache_of(make_cfg("data.source=wds", f"data.path={d}/nolabel.tar"))
    with pytest.raises(DataError, match="without a 'cls' label"):
        probe_cache(cache, FAST_PROBE)


def test_single_class_cache_is_a_clear_error(make_cfg, tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    with wds.TarWriter(str(d / "one.tar")) as w:
        for i in range(60):
            w.write({"__key__": f"o{i:03d}", "png": png_bytes(i), "cls": 0})
    cache = cache_of(make_cfg("data.source=wds", f"data.path={d}/one.tar"))
    with pytest.raises(DataError, match="class"):
        probe_cache(cache, FAST_PROBE)


def test_mismatched_dimensions_in_a_cache_are_a_clear_error(make_cfg):
    import json
    from pathlib import Path

    cache = cache_of(make_cfg("data.limit=40"))
    manifest = json.loads((Path(cache) / "manifest.json").read_text())
    manifest["teacher"]["num_features"] = 65  # a manifest that disagrees with its shards
    (Path(cache) / "manifest.json").write_text(json.dumps(manifest))
    from vitdistill.errors import CacheError

    with pytest.raises(CacheError, match=r"shape \(64,\).*expected \(65,\)"):
        probe_cache(cache, FAST_PROBE)


def test_splits_used_by_the_probe_are_the_recorded_ones(make_cfg):
    cache = cache_of(make_cfg("data.limit=200"))
    fc = FeatureCache.open(cache)
    report = probe_cache(cache, FAST_PROBE)
    counts = fc.manifest["split"]["counts"]
    assert report.split_sizes == counts
    tr, te = fc.load("train"), fc.load("test")
    assert not set(tr["key"]) & set(te["key"])
    assert np.isfinite(list(report.metrics.values())).all()


def test_probe_per_layer_and_on_all_layers_picks_the_best_on_val(make_cfg):
    cache = cache_of(make_cfg("data.limit=200", "teacher.layers=3"))
    report = probe_cache(cache, FAST_PROBE)
    m, rows = report.metrics, report.tables["layers"]
    assert [r["layer"] for r in rows] == ["-3", "-2", "-1", "concat"] and rows[-1]["dim"] == 3 * 128
    assert {f"layer{b}_linear_top1" for b in (-3, -2, -1)} <= set(m) and 0 <= m["layers_concat_linear_top1"] <= 1
    best = max(reversed(rows[:-1]), key=lambda r: r["val_top1"])  # ties: the deeper block
    assert m["best_layer"] == int(best["layer"])
    assert m["best_layer_linear_top1"] == m[f"layer{best['layer']}_linear_top1"] == pytest.approx(best["test_top1"], abs=1e-4)
    assert "best layer" in report.headline


def test_probe_stage_on_spilled_memory_maps_equals_the_probes_in_memory(make_cfg):
    """probe_cache reads float16 memory maps; the same probes on fc.load()'s float32 arrays agree."""
    from vitdistill.probes import fewshot_probe, knn_probe, linear_probe

    cache = cache_of(make_cfg("data.limit=200"))
    report = probe_cache(cache, FAST_PROBE)
    fc = FeatureCache.open(cache)
    (xtr, ytr), (xva, yva), (xte, yte) = [(d["emb"], d["cls"]) for d in (fc.load(s) for s in ("train", "val", "test"))]
    assert xtr.dtype == np.float32
    c = len(fc.classes)
    knn = knn_probe(xtr, ytr, xte, yte, ks=(5,), num_classes=c)
    few = fewshot_probe(xtr, ytr, xva, yva, xte, yte, shots=(1, 5), seeds=(0, 1), num_classes=c)
    lin = linear_probe(xtr, ytr, xva, yva, xte, yte, num_classes=c)
    assert report.metrics["knn5_top1"] == knn.top1[5] and report.metrics["knn5_top5"] == knn.top5[5]
    assert all(report.metrics[f"fewshot_{k}shot_top1"] == v for k, v in few.mean_top1.items())
    assert report.metrics["linear_top1"] == lin.top1 and report.metrics["linear_chosen_l2"] == lin.chosen_l2
