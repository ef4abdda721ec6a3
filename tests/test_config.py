from pathlib import Path

import pytest

from vitdistill.config import VitdistillConfig, flatten, load_config
from vitdistill.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_have_required_keys():
    flat = flatten(VitdistillConfig())
    for key in ("data.source", "data.path", "teacher.name", "cache.root", "student.name", "tracking.uri"):
        assert key in flat
    assert flat["data.source"] == "digits"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)


def test_misspelt_key_names_it_in_one_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  sourse: digits\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "\n" not in msg
    assert "data.sourse" in msg and str(p) in msg and "source" in msg


def test_wrong_type_names_key_and_expectation():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["teacher.batch_size=lots"])
    assert "teacher.batch_size" in str(e.value) and "integer" in str(e.value) and "lots" in str(e.value)


def test_unknown_section_and_bad_literal():
    with pytest.raises(ConfigError, match="unknown key 'teachr'"):
        load_config(None, ["teachr.name=x"])
    with pytest.raises(ConfigError, match="data.source"):
        load_config(None, ["data.source=imagenet"])


def test_set_overrides_file_and_parses_yaml_values(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  source: shapes\n  num_samples: 100\nprobe:\n  knn_k: [5]\n")
    cfg = load_config(p, ["data.num_samples=300", "probe.knn_k=[3, 7]", "cache.logits_topk=null"])
    assert cfg.data.source == "shapes" and cfg.data.num_samples == 300 and cfg.probe.knn_k == [3, 7]


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config(None, ["data.source=folder"])
    with pytest.raises(ConfigError, match="val_fraction"):
        load_config(None, ["data.val_fraction=0.6", "data.test_fraction=0.5"])


@pytest.mark.parametrize("item", ["nodot", "=3", "a..b=1"])
def test_malformed_set(item):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, [item])


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_tracking_uri_resolution(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert VitdistillConfig().tracking.resolved_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert VitdistillConfig().tracking.resolved_uri() == "http://127.0.0.1:5000"
    assert load_config(None, ["tracking.uri=sqlite:///x.db"]).tracking.resolved_uri() == "sqlite:///x.db"


def test_teacher_name_may_list_several_teachers():
    cfg = load_config(None, ["teacher.name=[effnet_lite0_imagenet, effnet_lite1_imagenet]"])
    assert cfg.teacher.names == ["effnet_lite0_imagenet", "effnet_lite1_imagenet"]
    one = cfg.for_teacher("effnet_lite1_imagenet")
    assert one.teacher.name == "effnet_lite1_imagenet" and cfg.teacher.name == cfg.teacher.names  # a copy
    assert load_config(None, ["teacher.name=[effnet_lite0_imagenet]"]).teacher.name == "effnet_lite0_imagenet"
    for bad, says in (("[a, a]", "distinct"), ("[]", "non-empty"), ("''", "empty")):
        with pytest.raises(ConfigError, match=says):
            load_config(None, [f"teacher.name={bad}"])
    with pytest.raises(ConfigError, match="teacher.checkpoint.*one teacher"):
        load_config(None, ["teacher.name=[a, b]", "teacher.checkpoint=/w.safetensors"])
    from vitdistill.models.teachers import create_teacher

    with pytest.raises(ConfigError, match="lists 2 teachers"):
        create_teacher(cfg.teacher)
