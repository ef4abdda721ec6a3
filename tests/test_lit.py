"""LiT: loss numerics, text towers, tokenizer, evaluation math, bad inputs, and end-to-end runs."""

from __future__ import annotations

import io
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from vitdistill.cache.tario import TarShardWriter, dump_npy
from vitdistill.config import LitConfig, load_config
from vitdistill.data.shapes import HELDOUT_COMBOS
from vitdistill.errors import ConfigError, DataError, RegistryError
from vitdistill.lit import (
    LitModel,
    WordTokenizer,
    create_lit_loss,
    create_text_tower,
    list_lit_losses,
    list_text_towers,
    load_lit_data,
    recall_at_k,
    run_lit,
    sigmoid_contrastive_loss,
    softmax_contrastive_loss,
    zeroshot_classifier,
)
from vitdistill.lit.losses import multi_positive_ce
from vitdistill.lit.train import LitObjective, TextFeatures, lit_parts, positives_for
from vitdistill.trainer import TrainingError, param_groups

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def minilm():
    return create_text_tower("minilm")


def build_tower(name: str, minilm_fixture=None, tmp_path=None):
    if name == "minilm":
        return minilm_fixture
    if name == "open_clip":  # a tiny random open_clip model written by the test (no hub)
        from tests.test_teachers import save_open_clip

        model, path = save_open_clip(tmp_path)
        return create_text_tower(f"open_clip:{model}/local", checkpoint=path)
    return create_text_tower(name, corpus=["a red circle", "a blue square"], width=32, layers=1, heads=2)


def write_fake_cache(root, n: int = 300, dim: int = 16, classes=("cat", "dog", "fish"), with_cls: bool = True,
                     captions=None, source: str = "digits", seed: int = 0) -> str:
    """A feature cache whose embeddings are class means plus noise; split by index (70/10/20)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(len(classes), dim)) * 3.0  # (C, D)
    cls = rng.integers(len(classes), size=n)  # (N,)
    emb = (means[cls] + rng.normal(size=(n, dim))).astype(np.float32)  # (N, D)
    os.makedirs(root, exist_ok=True)
    w = TarShardWriter(os.path.join(root, "feat-00000-000.tar"))
    for i in range(n):
        fields = {"emb.npy": dump_npy(emb[i]), "split.txt": (["train"] * 7 + ["val"] + ["test"] * 2)[i % 10].encode()}
        if with_cls:
            fields["cls"] = str(int(cls[i])).encode()
        if captions is not None and captions(i, int(cls[i])) is not None:  # None: this sample has no caption
            fields["txt"] = captions(i, int(cls[i])).encode()
        w.write(f"s{i:05d}", fields)
    w.close()
    manifest = {"kind": "features", "shards": [{"name": "feat-00000-000.tar", "count": n}],
                "teacher": {"num_features": dim}, "num_samples": n,
                "classes": list(classes) if with_cls else None, "dataset": {"source": source}}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return str(root)


FAST_SCRATCH = dict(text_tower="scratch", scratch_width=32, scratch_layers=1, scratch_heads=2, epochs=8)


@pytest.fixture(scope="module")
def shapes_cache(tmp_path_factory):
    """600 real shapes through the packaged effnet_lite0_imagenet teacher (a few seconds)."""
    from vitdistill.data.ingest import resolve_inputs
    from vitdistill.extract import extract

    tmp = tmp_path_factory.mktemp("lit-shapes")
    cfg = load_config(None, [f"cache.root={tmp}", "data.source=shapes", "data.num_samples=600",
                             "data.image_size=48", "cache.dtype=float32"])
    plan, _ = extract(cfg, resolve_inputs(cfg, progress=False), progress=False)
    return plan.cache_dir


# --------------------------------------------------------------------------- registries


def test_registries_list_and_name_valid_choices():
    assert list_text_towers() == ["minilm", "open_clip", "scratch"]
    assert list_lit_losses() == ["sigmoid", "softmax"]
    with pytest.raises(RegistryError, match="valid text towers: minilm, open_clip, scratch"):
        create_text_tower("bert")
    with pytest.raises(RegistryError, match="valid text towers"):
        create_text_tower("openclip:ViT-B-32/openai")
    with pytest.raises(RegistryError, match="did you mean 'sigmoid'"):
        create_lit_loss("sigmoidd")


# --------------------------------------------------------------------------- losses


def test_softmax_loss_near_zero_when_aligned_at_high_temperature():
    x = torch.eye(6)  # (6, 6) orthonormal: pair i <-> i is perfectly aligned
    loss = softmax_contrastive_loss(x, x, torch.tensor(100.0), torch.eye(6, dtype=torch.bool))
    assert float(loss) < 1e-12 + 6 * math.exp(-100) * 2
    assert float(softmax_contrastive_loss(x, x, torch.tensor(1.0), torch.eye(6, dtype=torch.bool))) > 1.0


def test_softmax_loss_matches_hand_computation():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    t = 10.0
    s = [[0.6, 1.0], [0.8, 0.0]]  # s[i][j] = <img_i, txt_j>
    i2t = [-(t * s[i][i]) + math.log(sum(math.exp(t * s[i][j]) for j in range(2))) for i in range(2)]
    t2i = [-(t * s[j][j]) + math.log(sum(math.exp(t * s[i][j]) for i in range(2))) for j in range(2)]
    expected = 0.5 * (sum(i2t) / 2 + sum(t2i) / 2)
    got = softmax_contrastive_loss(img, txt, torch.tensor(t), torch.eye(2, dtype=torch.bool))
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # with one positive per row it is exactly CLIP's symmetric cross-entropy
    logits = t * img @ txt.T
    clip = 0.5 * (F.cross_entropy(logits, torch.arange(2)) + F.cross_entropy(logits.T, torch.arange(2)))
    assert float(got) == pytest.approx(float(clip), rel=1e-6)


def test_duplicate_captions_are_one_text_with_several_positive_images():
    ids = torch.tensor([4, 7, 4, 9])  # images 0 and 2 share caption 4
    groups = torch.arange(10)
    distinct, pos = positives_for(ids, groups)
    assert distinct.tolist() == [4, 7, 9]
    assert pos.tolist() == [[True, False, False], [False, True, False], [True, False, False], [False, False, True]]
    # text->image row for caption 4: -log(p(img0) + p(img2))
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.5, 0.0], [1.0, -0.5, 0.3], [0.0, 0.2, 2.5]])
    col = logits[:, 0]
    expected_row0 = -math.log((math.exp(col[0]) + math.exp(col[2])) / sum(math.exp(v) for v in col))
    per_col = [multi_positive_ce(logits.T[j:j + 1], pos.T[j:j + 1]) for j in range(3)]
    assert float(per_col[0]) == pytest.approx(expected_row0, rel=1e-6)
    # generated captions: prompts of one class share a group, so they are positives of each other
    distinct, pos = positives_for(torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1]))
    assert pos.tolist() == [[True, True, False], [True, True, False], [False, False, True]]


def test_sigmoid_loss_matches_hand_computation():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    txt = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    pos = torch.tensor([[False, True], [True, False], [True, False]])
    t, b = 10.0, -10.0
    total = 0.0
    for i in range(3):
        for j in range(2):
            z = 1.0 if pos[i, j] else -1.0
            logit = t * float(img[i] @ txt[j]) + b
            total += math.log(1.0 + math.exp(-z * logit))  # -log sigmoid(z * logit)
    got = sigmoid_contrastive_loss(img, txt, torch.tensor(t), torch.tensor(b), pos)
    assert float(got) == pytest.approx(total / 3, rel=1e-6)


@pytest.mark.parametrize("name", list_lit_losses())
def test_temperature_starts_at_10_and_is_learnable(name):
    loss_fn = create_lit_loss(name)
    torch.manual_seed(0)
    img = F.normalize(torch.randn(8, 4), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(8, 4), dim=-1)
    out = loss_fn(img, txt, torch.eye(8, dtype=torch.bool))
    assert {"loss", "contrastive_loss", "temperature"} <= set(out)
    assert float(out["temperature"]) == pytest.approx(10.0)
    if name == "sigmoid":
        assert float(out["bias"]) == pytest.approx(-10.0)
    out["loss"].backward()
    assert loss_fn.log_t.requires_grad and loss_fn.log_t.grad is not None and float(loss_fn.log_t.grad) != 0.0
    torch.optim.SGD(loss_fn.parameters(), lr=0.1).step()
    assert float(loss_fn.temperature().detach()) != pytest.approx(10.0)


# --------------------------------------------------------------------------- text towers


def test_word_tokenizer():
    tok = WordTokenizer.build(["A red circle.", "a blue circle", "a Red square"])
    assert tok.vocab[:2] == ["<pad>", "<unk>"]
    assert tok.vocab[2:5] == ["a", "circle", "red"]  # by frequency, then alphabetical
    assert tok.tokenize("A red  star!") == ["a", "red", "star", "!"]
    ids, mask = tok.encode(["a red star", "circle", ""], max_length=8)
    assert ids.shape == mask.shape == (3, 3)
    assert ids[0].tolist() == [tok.index["a"], tok.index["red"], 1]  # unseen word -> <unk>
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0]]  # an empty text is one <unk>
    assert tok.encode(["a red circle a red circle"], max_length=4)[0].shape == (1, 4)


@pytest.mark.parametrize("name", list_text_towers())
def test_towers_give_normalised_embeddings_of_their_dim(name, minilm, tmp_path):
    tower = build_tower(name, minilm, tmp_path)
    emb = tower.encode(["a red circle", "a blue striped square", "the digit 3"])
    assert emb.shape == (3, {"minilm": 384, "scratch": 32, "open_clip": 16}[name])
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    model = LitModel(tower, image_dim=20, embed_dim=8)
    assert torch.allclose(model(["a red circle"]).norm(dim=1), torch.ones(1), atol=1e-5)
    assert model.encode_image(torch.randn(5, 20)).shape == (5, 8)


def test_minilm_is_offline_sentence_transformers_and_semantic(minilm):
    from sentence_transformers import SentenceTransformer

    from vitdistill.lit.text import minilm_path

    texts = ["a red circle", "a red round shape", "a green square"]
    ours = minilm.encode(texts)
    reference = SentenceTransformer(minilm_path(), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(ours, reference, atol=1e-4)
    sim = ours @ ours.T
    assert sim[0, 1] > sim[0, 2] + 0.1


# --------------------------------------------------------------------------- evaluation math


def test_recall_at_k_over_distinct_texts():
    img = np.eye(3, dtype=np.float32)  # (3, 3)
    txt = np.array([[1, 0, 0], [0, 0.9, 0.1], [0, 1, 0]], dtype=np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    text_of_image = np.array([0, 1, 1])  # images 1 and 2 share text 1; text 2 is a distractor
    r = recall_at_k(img, txt, text_of_image, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(2 / 3)  # image 1 ranks distractor text 2 above its own text 1
    assert r["i2t_r2"] == 1.0
    assert r["t2i_r1"] == 1.0  # text 0 -> image 0 first; text 1 -> image 1 (one of its two positives) first
    assert r["t2i_r2"] == 1.0  # text 2 has no image, so it is not a query


def test_zeroshot_classifier_averages_and_renormalises():
    prompts = np.array([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [-1.0, 0.0]]])  # (C=2, T=2, E=2)
    c = zeroshot_classifier(prompts)
    assert np.allclose(c, [[math.sqrt(0.5), math.sqrt(0.5)], [-1.0, 0.0]])


# --------------------------------------------------------------------------- data and bad inputs


def test_no_captions_and_no_classes_is_a_data_error(tmp_path):
    cache = write_fake_cache(tmp_path / "c", n=40, with_cls=False)
    with pytest.raises(DataError, match="no captions .* and no class names"):
        load_lit_data(cache)


def test_empty_caption_names_the_sample(tmp_path):
    cache = write_fake_cache(tmp_path / "c", n=40, captions=lambda i, c: "  " if i == 13 else f"a {c}")
    with pytest.raises(DataError, match="sample 's00013' has an empty caption"):
        load_lit_data(cache)


def test_captions_generated_from_class_names(tmp_path):
    cache = write_fake_cache(tmp_path / "c", n=60, source="digits")
    data = load_lit_data(cache)
    assert data.captions_generated and data.prompt_ids.shape == (3, len(data.templates))
    assert data.texts[data.prompt_ids[1, 0]] == "a photo of the digit dog."
    assert data.train.options.shape[1] == len(data.templates) and data.test.options.shape[1] == 1
    # every prompt of a class is in the class's group, so its prompts are not negatives of each other
    assert (data.text_groups[data.prompt_ids] == np.arange(3)[:, None]).all()
    c0 = int(data.train.cls[0])
    assert {data.texts[i] for i in data.train.options[0]} == {t.format(data.classes[c0]) for t in data.templates}


def test_end_to_end_scratch_on_generated_captions_is_deterministic(tmp_path):
    cache = write_fake_cache(tmp_path / "c", n=300, source="generic")
    cfg = LitConfig(**FAST_SCRATCH)
    seen = []
    a = run_lit(cache, cfg, progress=False, on_epoch=seen.append)
    b = run_lit(cache, cfg, progress=False)
    assert [r["epoch"] for r in seen] == list(range(cfg.epochs))  # the trainer's numbering, from 0
    assert set(seen[0]) >= {"epoch", "train_loss", "val_loss", "temperature", "seconds"}
    assert a.metrics["zeroshot_top1"] > a.metrics["chance_top1"] + 0.3
    for k, v in a.metrics.items():
        if k != "train_seconds":
            assert b.metrics[k] == pytest.approx(v, abs=1e-6), k
    assert a.history[-1]["train_loss"] < a.history[0]["train_loss"]
    assert isinstance(a.figures["lit_loss.png"], Figure) and a.headline.startswith("LiT scratch")
    buf = io.BytesIO()
    torch.save(a.model, buf)  # what mlflow.pytorch.log_model pickles
    buf.seek(0)
    restored = torch.load(buf, weights_only=False)
    assert torch.allclose(restored(["a photo of a dog."]), a.model(["a photo of a dog."]))


def test_open_clip_text_tower_is_encode_text_and_trains_in_lit(tmp_path):
    import open_clip

    from tests.test_teachers import save_open_clip

    model, path = save_open_clip(tmp_path)
    tower = create_text_tower(f"open_clip:{model}/local", checkpoint=path)
    ref = open_clip.create_model(model)
    ref.load_state_dict(torch.load(path, weights_only=True))
    texts = ["a red circle", "a dog"]
    assert tower.pretrained and torch.allclose(tower(texts), ref.eval().encode_text(open_clip.get_tokenizer(model)(texts)))
    cache = write_fake_cache(tmp_path / "c", n=300, captions=lambda i, c: ["a cat", "a dog", "a fish"][c])
    cfg = LitConfig(text_tower=f"open_clip:{model}/local", text_checkpoint=path, epochs=8)
    report = run_lit(cache, cfg, progress=False)
    assert report.metrics["zeroshot_top1"] > report.metrics["chance_top1"] + 0.3
    assert report.headline.startswith(f"LiT open_clip:{model}/local (frozen)")
    torch.save(report.model, io.BytesIO())  # what mlflow.pytorch.log_model pickles
    with pytest.raises(ConfigError, match="lit.text_checkpoint"):
        create_text_tower("open_clip:ViT-B-32/laion2b_s34b_b79k")


def test_non_finite_lit_loss_stops_with_the_step(tmp_path):
    cache = write_fake_cache(tmp_path / "c", n=60, source="generic")
    with pytest.raises(TrainingError, match=r"^step 2 \(epoch 1\): loss is nan \(.*\); lower lit\.lr"):
        run_lit(cache, load_config(None, ["lit.text_tower=scratch", "lit.lr=.inf"]).lit, progress=False)


@pytest.mark.parametrize("frozen", [True, False])
def test_lit_param_groups_keep_their_learning_rates_and_decay_rules(minilm, frozen):
    cfg = LitConfig(lr=1e-3, text_lr=1e-5, temperature_lr=0.1, weight_decay=0.5)
    model = LitModel(minilm, image_dim=16, embed_dim=8)
    loss_fn = create_lit_loss("sigmoid")
    objective = LitObjective(model, loss_fn, TextFeatures(model, ["a"], frozen=False), torch.zeros(1), frozen)
    groups = param_groups(lit_parts(objective, cfg), cfg.weight_decay)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert lr_of[id(loss_fn.log_t)] == lr_of[id(loss_fn.bias)] == (0.1, 0.0)
    assert lr_of[id(model.image_head.weight)] == (1e-3, 0.5) and lr_of[id(model.image_head.bias)] == (1e-3, 0.0)
    tower = list(minilm.parameters())
    assert tower and all(p.requires_grad for p in tower)
    heads = [*model.text_head.parameters(), *model.image_head.parameters(), *loss_fn.parameters()]
    assert set(lr_of) == {id(p) for p in heads + ([] if frozen else tower)}
    if not frozen:  # the pretrained tower at text_lr; its norms and biases without decay
        assert {lr_of[id(p)] for p in tower if p.ndim == 1} == {(1e-5, 0.0)}
        assert {lr_of[id(p)] for p in tower if p.ndim == 2} == {(1e-5, 0.5)}


def test_sigmoid_loss_trains_too(tmp_path):
    cache = write_fake_cache(tmp_path / "c", n=300, captions=lambda i, c: ["a cat", "a dog", "a fish"][c])
    report = run_lit(cache, LitConfig(**FAST_SCRATCH, loss="sigmoid"), progress=False)
    assert "bias" in report.metrics and report.metrics["zeroshot_top1"] > report.metrics["chance_top1"] + 0.3


@pytest.mark.slow
def test_lit_on_real_shapes_cache(shapes_cache):
    data = load_lit_data(shapes_cache)
    train_combos = {(m["colour"], m["shape"]) for m in data.train.meta + data.val.meta}
    assert not train_combos & HELDOUT_COMBOS
    assert data.removed_heldout["train"] > 0 and data.test.heldout.sum() > 0

    report = run_lit(shapes_cache, LitConfig(), progress=False)
    m = report.metrics
    assert m["chance_top1"] == pytest.approx(1 / 6)
    assert m["zeroshot_top1"] > 0.5 and m["heldout_zeroshot_top1"] > 0.4
    for d in ("i2t", "t2i"):
        r1, r5, r10 = (m[f"retrieval_{d}_r{k}"] for k in (1, 5, 10))
        assert 0.0 <= r1 <= r5 <= r10 <= 1.0
    assert report.split_sizes["train"] == len(data.train) and report.split_sizes["test_heldout_combos"] > 0
    assert len(report.history) == LitConfig().epochs and report.metrics["temperature"] > 0


def test_recall_at_k_in_chunks_matches_the_whole_matrix(monkeypatch):
    """Retrieval streamed over image chunks (each a few rows of the similarity matrix) gives exactly the
    ranks of the whole (N, U) matrix, computed here the direct way."""
    import vitdistill.lit.evaluate as ev

    rng = np.random.default_rng(0)
    img = rng.normal(size=(300, 16)).astype(np.float32)
    txt = rng.normal(size=(40, 16)).astype(np.float32)
    text_of_image = rng.integers(0, 35, size=300)  # texts 35..39 are distractors only
    sim = img @ txt.T
    own = sim[np.arange(300), text_of_image]
    i2t = (sim > own[:, None]).sum(1)
    best = np.full(40, -np.inf)
    np.maximum.at(best, text_of_image, own)
    queried = np.unique(text_of_image)
    t2i = (sim[:, queried] > best[queried][None, :]).sum(0)
    want = {f"i2t_r{k}": float(np.mean(i2t < k)) for k in (1, 5)} | {f"t2i_r{k}": float(np.mean(t2i < k)) for k in (1, 5)}
    whole = recall_at_k(img, txt, text_of_image, ks=(1, 5))
    monkeypatch.setattr(ev, "SIM_ELEMENTS", 7 * 40)  # chunks of 7 images
    chunked = recall_at_k(img, txt, text_of_image, ks=(1, 5))
    assert whole == chunked == pytest.approx(want)
    assert 0 < want["i2t_r1"] < 1 and 0 < want["t2i_r1"] < 1  # the ranks are not trivial


def test_lit_data_spilled_to_disk_is_a_float16_memory_map_with_the_same_batches(tmp_path, shapes_cache):
    """With a spill directory the embeddings are one memory map, in the cache's stored dtype, that every split
    indexes by its rows; the batches it gives are the in-memory ones."""
    from vitdistill.lit.train import LitBatches

    mem = load_lit_data(shapes_cache)
    spilled = load_lit_data(shapes_cache, spill_dir=str(tmp_path))
    from vitdistill.cache.reader import FeatureCache

    stored = next(FeatureCache.open(shapes_cache).iter_samples())["emb"].dtype  # the cache's own dtype
    assert isinstance(spilled.train.emb, np.memmap) and spilled.train.emb.dtype == stored
    assert mem.train.emb.dtype == np.float32 and not isinstance(mem.train.emb, np.memmap)
    assert spilled.train.emb is spilled.test.emb  # one map for the whole cache, no copy per split
    assert list(tmp_path.glob("*.npy")) and not spilled.train.emb.flags.writeable
    for name in ("train", "val", "test"):
        a, b = getattr(mem, name), getattr(spilled, name)
        assert len(a) == len(b) > 0 and (a.rows == b.rows).all()
        np.testing.assert_array_equal(a.embeddings(), b.embeddings())
    batches = [LitBatches(d.train, 64, seed=3) for d in (mem, spilled)]
    for x, y in zip(batches[0].batches(1), batches[1].batches(1)):
        assert x["input"].dtype == y["input"].dtype == torch.float32
        assert torch.equal(x["input"], y["input"]) and torch.equal(x["text_ids"], y["text_ids"])
