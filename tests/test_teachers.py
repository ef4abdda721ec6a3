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
