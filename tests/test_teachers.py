import pytest
import torch

from vitdistill.config import TeacherConfig
from vitdistill.errors import ConfigError, RegistryError
from vitdistill.models.teachers import TEACHERS, create_teacher, list_teachers


@pytest.mark.parametrize("name", list_teachers())
def test_registered_teachers_build_and_run(name):
    t = create_teacher(TeacherConfig(name=name))
    x = torch.randn(2, *t.data_config["input_size"])
    emb, logits = t(x)
    assert emb.shape == (2, t.num_features) and torch.isfinite(emb).all()
    assert not t.model.training and not any(p.requires_grad for p in t.model.parameters())
    assert len(t.weights_sha256) == 64


def test_packaged_effnet_classifies_a_real_cat():
    from PIL import Image
    from skimage.data import chelsea

    t = create_teacher(TeacherConfig(name="effnet_lite0_imagenet"))
    assert t.data_config["input_size"] == [3, 224, 224] and t.data_config["crop_pct"] == 0.875
    x = t.transform()(Image.fromarray(chelsea()))[None]
    _, logits = t(x)
    top3 = [t.class_names[i] for i in logits[0].topk(3).indices]
    assert all("cat" in name for name in top3), top3


def test_unknown_teacher_names_valid_choices():
    with pytest.raises(RegistryError) as e:
        create_teacher(TeacherConfig(name="effnet_lite0_imagenett"))
    msg = str(e.value)
    assert "effnet_lite0_imagenet" in msg and "timm" in msg


def test_random_init_is_reproducible_and_differs_from_pretrained():
    a = create_teacher(TeacherConfig(name="test_vit", pretrained=False))
    b = create_teacher(TeacherConfig(name="test_vit", pretrained=False, batch_size=7))  # another cache entry
    assert a is not b and a.weights_sha256 == b.weights_sha256
    real = create_teacher(TeacherConfig(name="effnet_lite0_imagenet"))
    rand = create_teacher(TeacherConfig(name="effnet_lite0_imagenet", pretrained=False))
    assert real.weights_sha256 != rand.weights_sha256


def test_hub_failure_offline_is_one_actionable_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as e:
        create_teacher(TeacherConfig(name="resnet10t", pretrained=True))
    assert "teacher.checkpoint" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_local_checkpoint_weights_only(tmp_path, fmt):
    src = create_teacher(TeacherConfig(name="test_vit", pretrained=False))
    sd = {k: (v + 0.5).contiguous() for k, v in src.model.state_dict().items()}
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, path)
    t = create_teacher(TeacherConfig(name="test_vit", checkpoint=str(path)))
    k = next(iter(sd))
    assert torch.equal(t.model.state_dict()[k].cpu(), sd[k])
    assert t.weights_sha256 != src.weights_sha256


def test_checkpoint_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": Evil()}, path)
    with pytest.raises(ConfigError, match="weights-only"):
        create_teacher(TeacherConfig(name="test_vit", checkpoint=str(path)))


def test_checkpoint_that_does_not_fit(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"foo": torch.zeros(3)}, str(path))
    with pytest.raises(ConfigError, match="does not fit"):
        create_teacher(TeacherConfig(name="test_vit", checkpoint=str(path)))


def test_registry_lists_and_rejects_duplicates():
    assert "effnet_lite0_imagenet" in TEACHERS.list("effnet*")
    with pytest.raises(ValueError):
        TEACHERS.register("effnet_lite0_imagenet")(lambda cfg: None)


# --------------------------------------------------------------------------- every source, offline

TINY_VIT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)


def save_hf(tmp_path, kind: str) -> str:
    """A tiny random transformers vision model + its image processor, written with save_pretrained."""
    import transformers as tf

    model, proc = {
        "dinov2": (lambda: tf.Dinov2Model(tf.Dinov2Config(**TINY_VIT)),
                   lambda: tf.BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                                                image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])),
        "clip": (lambda: tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**TINY_VIT, projection_dim=16)),
                 lambda: tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})),
        "siglip": (lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**TINY_VIT)),
                   lambda: tf.SiglipImageProcessor(size={"height": 32, "width": 32})),
    }[kind]
    path = tmp_path / f"hf-{kind}"
    torch.manual_seed(1)
    model().save_pretrained(path)
    proc().save_pretrained(path)
    return str(path)


TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def save_open_clip(tmp_path) -> tuple[str, str]:
    """A tiny open_clip model config registered as ``vd-tiny-clip`` and its random weights (torch.save'd)."""
    import json

    import open_clip

    cfg_path = tmp_path / "vd-tiny-clip.json"
    cfg_path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(cfg_path))
    torch.manual_seed(1)
    path = tmp_path / "tiny-clip.pth"
    torch.save(open_clip.create_model("vd-tiny-clip").state_dict(), path)
    return "vd-tiny-clip", str(path)


def save_timm_dir(tmp_path) -> str:
    """A timm model directory as a hub repo holds it (config.json + model.safetensors)."""
    import timm
    from timm.models import save_for_hf

    path = tmp_path / "timm-test-vit"
    torch.manual_seed(1)
    save_for_hf(timm.create_model("test_vit"), str(path))
    return str(path)


SOURCE_EXAMPLES = {  # source -> one offline teacher of it built from a checkpoint the test writes
    "timm": lambda p: TeacherConfig(name="timm:test_vit", pretrained=False),
    "hf-hub": lambda p: TeacherConfig(name="hf-hub:timm/test_vit.r160_in1k", checkpoint=save_timm_dir(p)),
    "hf": lambda p: TeacherConfig(name="hf:facebook/dinov2-small", checkpoint=save_hf(p, "dinov2")),
    "open_clip": lambda p: TeacherConfig(name="open_clip:vd-tiny-clip/local", checkpoint=save_open_clip(p)[1]),
}


def test_every_teacher_source_has_an_offline_example():
    from vitdistill.models.teachers import list_teacher_sources

    assert sorted(SOURCE_EXAMPLES) == list_teacher_sources()


@pytest.mark.parametrize("source", sorted(SOURCE_EXAMPLES))
def test_teacher_sources_build_run_and_give_layers(tmp_path, source):
    cfg = SOURCE_EXAMPLES[source](tmp_path)
    t = create_teacher(cfg)
    x = torch.randn(2, *t.data_config["input_size"])
    emb, logits = t(x)
    assert emb.shape == (2, t.num_features) and torch.isfinite(emb).all()
    assert (logits is None) == (t.num_classes == 0)
    assert not t.model.training and not any(p.requires_grad for p in t.model.parameters())
    assert len(t.weights_sha256) == 64 and "/" not in t.slug and ":" not in t.slug
    assert t.pil_transform() and t.data_config["input_size"][0] == 3
    deep = create_teacher(cfg.model_copy(update={"layers": [-3, -1]}))
    out = deep.forward(x)
    assert out.layers.shape == (2, sum(deep.layer_dims)) and len(deep.layer_dims) == 2
    torch.testing.assert_close(out.emb, emb, atol=1e-4, rtol=1e-4)  # one forward pass gives both
    assert deep.fingerprint()["layers"]["blocks"] == [-3, -1] and "layers" not in t.fingerprint()


def test_hf_teachers_read_preprocessing_and_pool_by_model(tmp_path):
    dino = create_teacher(TeacherConfig(name="hf:facebook/dinov2-small", checkpoint=save_hf(tmp_path, "dinov2"), layers=2))
    assert dino.data_config["input_size"] == [3, 32, 32] and dino.data_config["crop_pct"] == pytest.approx(32 / 36)
    assert dino.data_config["mean"] == pytest.approx([0.485, 0.456, 0.406]) and dino.num_features == 64  # CLS + patch mean
    assert dino.layer_dims == [64, 64] and dino.num_classes == 0
    x = torch.randn(2, 3, 32, 32)
    out = dino.model(pixel_values=x)
    lhs = out.last_hidden_state
    torch.testing.assert_close(dino(x)[0], torch.cat([lhs[:, 0], lhs[:, 1:].mean(1)], 1))
    clip = create_teacher(TeacherConfig(name="hf:openai/clip-vit-base-patch32", checkpoint=save_hf(tmp_path, "clip")))
    assert clip.num_features == 16 and clip.architecture == "hf:CLIPVisionModelWithProjection"  # projected image_embeds
    sig = create_teacher(TeacherConfig(name="hf:google/siglip-base-patch16-224", checkpoint=save_hf(tmp_path, "siglip"),
                                       layers=1))
    assert sig.data_config["crop_mode"] == "squash" and sig.data_config["mean"] == [0.5, 0.5, 0.5]
    assert sig.num_features == 32 and sig.layer_dims == [32]  # pooled head; no class token: token mean


def test_open_clip_teacher_matches_encode_image(tmp_path):
    import open_clip

    name, path = save_open_clip(tmp_path)
    t = create_teacher(TeacherConfig(name=f"open_clip:{name}", checkpoint=path))
    ref = open_clip.create_model(name)
    ref.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(t(x)[0], ref.eval().encode_image(x))
    assert t.num_features == 16 and t.num_classes == 0 and t.data_config["mean"] == pytest.approx(list(open_clip.OPENAI_DATASET_MEAN))
    # a local copy of an open_clip hub repo (open_clip_config.json + open_clip_model.safetensors) needs no checkpoint key
    import json

    from safetensors.torch import save_file

    repo = tmp_path / "clip-repo"
    repo.mkdir()
    pp = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear", "resize_mode": "squash"}
    (repo / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": pp}))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(repo / "open_clip_model.safetensors"))
    local = create_teacher(TeacherConfig(name=f"open_clip:local-dir:{repo}"))
    torch.testing.assert_close(local(x)[0], t(x)[0])
    assert local.data_config["crop_mode"] == "squash" and local.data_config["interpolation"] == "bilinear"
    assert local.slug.startswith("open_clip-local-dir-")


@pytest.mark.parametrize("name, needle", [
    ("hf:facebook/dinov2-small", "save_pretrained directory"),
    ("open_clip:ViT-B-32/laion2b_s34b_b79k", "set teacher.checkpoint to a local checkpoint file"),
    ("hf-hub:timm/vit_small_patch14_dinov2.lvd142m", "set teacher.checkpoint to a local directory"),
])
def test_offline_hub_sources_fail_in_one_line_naming_the_key(name, needle):
    with pytest.raises(ConfigError) as e:
        create_teacher(TeacherConfig(name=name))
    msg = str(e.value)
    assert needle in msg and "teacher.checkpoint" in msg and "\n" not in msg, msg


def test_unknown_source_and_open_clip_model_name_valid_choices():
    with pytest.raises(RegistryError, match="valid teacher sources: hf, hf-hub, open_clip, timm"):
        create_teacher(TeacherConfig(name="openclip:ViT-B-32/openai"))
    with pytest.raises(RegistryError, match="ViT-B-32"):
        create_teacher(TeacherConfig(name="open_clip:ViT-B-23/openai"))


def test_layers_that_do_not_fit_are_config_errors():
    t = create_teacher(TeacherConfig(name="test_vit", pretrained=False, layers=[40]))
    with pytest.raises(ConfigError, match="teacher.layers"):
        t.forward(torch.randn(1, *t.data_config["input_size"]))
    with pytest.raises(Exception, match="teacher.layers"):
        TeacherConfig(layers=0)


@pytest.mark.parametrize("name, top1", [
    ("effnet_lite0_imagenet", "tiger cat"),
    ("effnet_lite1_imagenet", "Egyptian cat"),
    ("effnet_lite2_imagenet", "Egyptian cat"),
])
def test_packaged_ladder_classifies_a_real_cat(name, top1):
    from PIL import Image
    from skimage.data import chelsea

    t = create_teacher(TeacherConfig(name=name))
    side = {"effnet_lite0_imagenet": 224, "effnet_lite1_imagenet": 240, "effnet_lite2_imagenet": 260}[name]
    assert t.data_config["input_size"] == [3, side, side]
    x = t.transform()(Image.fromarray(chelsea()))[None]
    _, logits = t(x)
    top3 = [t.class_names[i] for i in logits[0].topk(3).indices]
    assert all("cat" in c for c in top3) and t.class_names[int(logits[0].argmax())] == top1, top3


# --------------------------------------------------------------------------- checkpoints that are garbage or do not fit


def _timm_file(p):
    import timm
    from safetensors.torch import save_file

    path = p / "w.safetensors"
    save_file(timm.create_model("test_vit").state_dict(), str(path))
    return TeacherConfig(name="test_vit", checkpoint=str(path)), str(path)


def _open_clip_file(p):
    name, path = save_open_clip(p)
    return TeacherConfig(name=f"open_clip:{name}", checkpoint=path), path


def _hf_dir(p):
    d = save_hf(p, "dinov2")
    return TeacherConfig(name="hf:facebook/dinov2-small", checkpoint=d), f"{d}/model.safetensors"


def _timm_dir(p):
    d = save_timm_dir(p)  # save_for_hf writes pytorch_model.bin
    return TeacherConfig(name="hf-hub:timm/test_vit.r160_in1k", checkpoint=d), f"{d}/pytorch_model.bin"


CHECKPOINTS = {"timm": _timm_file, "open_clip": _open_clip_file, "hf": _hf_dir, "hf-hub": _timm_dir}


@pytest.mark.parametrize("source", sorted(CHECKPOINTS))
def test_garbage_safetensors_is_one_line_naming_the_file(tmp_path, source):
    import os

    cfg, weights = CHECKPOINTS[source](tmp_path)
    if os.path.isdir(cfg.checkpoint):  # a model directory: its safetensors file
        weights = os.path.join(cfg.checkpoint, "model.safetensors")
    elif not weights.endswith(".safetensors"):  # open_clip's example is a torch.save'd file
        weights = str(tmp_path / "w.safetensors")
        cfg = cfg.model_copy(update={"checkpoint": weights})
    with open(weights, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" * 64)  # not safetensors: "HeaderTooLarge"
    with pytest.raises(ConfigError) as e:
        create_teacher(cfg)
    msg = str(e.value)
    assert f"teacher.checkpoint {weights!r}: not a readable safetensors file (SafetensorError" in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("source", sorted(CHECKPOINTS))
def test_checkpoint_with_the_right_keys_and_a_wrong_shape_names_the_tensor(tmp_path, source):
    from safetensors.torch import load_file, save_file

    cfg, weights = CHECKPOINTS[source](tmp_path)
    safetensors = weights.endswith(".safetensors")
    sd = load_file(weights) if safetensors else torch.load(weights, weights_only=True)
    name = next(k for k, v in sd.items() if v.ndim == 1 and k.endswith("bias"))  # the first bias
    expected = tuple(sd[name].shape)
    sd[name] = torch.zeros(expected[0] + 3)
    save_file(sd, weights) if safetensors else torch.save(sd, weights)
    with pytest.raises(ConfigError) as e:
        create_teacher(cfg)
    msg = str(e.value)
    assert f"teacher.checkpoint {weights!r} does not fit " in msg, msg
    assert f"tensor {name!r} has shape ({expected[0] + 3},) in the checkpoint, the model expects {expected}" in msg, msg
    assert "\n" not in msg


def test_open_clip_local_dir_that_does_not_fit_or_is_garbage_names_the_file(tmp_path):
    import json

    from safetensors.torch import save_file

    _, path = save_open_clip(tmp_path)
    sd = torch.load(path, weights_only=True)
    sd["visual.ln_pre.bias"] = torch.zeros(35)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {"size": 32}}))
    weights = repo / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(weights))
    with pytest.raises(ConfigError, match=rf"^open_clip local-dir '{weights}' does not fit the model of its "
                                          r"open_clip_config\.json: tensor 'visual\.ln_pre\.bias' has shape \(35,\) in "
                                          r"the checkpoint, the model expects \(32,\)$"):
        create_teacher(TeacherConfig(name=f"open_clip:local-dir:{repo}"))
    weights.write_bytes(b"\x89PNG\r\n\x1a\n" * 64)
    with pytest.raises(ConfigError, match=rf"^open_clip local-dir '{weights}': not a readable safetensors file"):
        create_teacher(TeacherConfig(name=f"open_clip:local-dir:{repo}"))
