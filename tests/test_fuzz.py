"""Property-based fuzzing of the two readers of untrusted input: tar shards and config files.
The only allowed outcomes are success or a one-line :class:`VitdistillError`; never a hang, a
traceback from deep inside tarfile/yaml/pydantic, or silently fewer samples."""

from __future__ import annotations

import io

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitdistill.cache.tario import TarShardWriter, iter_tar_samples
from vitdistill.config import load_config
from vitdistill.errors import VitdistillError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _read_all(data: bytes) -> list[str] | VitdistillError:
    try:
        return [k for k, _ in iter_tar_samples(io.BytesIO(data), "fuzz.tar")]
    except VitdistillError as e:
        assert "\n" not in str(e) and str(e).startswith("fuzz.tar: ")
        return e


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "a.tar"
    w = TarShardWriter(str(path))
    for i in range(4):
        w.write(f"k{i}", {"png": bytes(range(256)) * (i + 1), "cls": b"1", "json": b'{"a": 1}'})
    w.close()
    return path.read_bytes()


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_are_samples_or_a_shard_error(data):
    _read_all(data)


@FUZZ
@given(cut=st.integers(min_value=0), flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(1, 255)),
                                                    max_size=4))
def test_truncated_or_flipped_shard_never_loses_samples_silently(shard, cut, flips):
    data = bytearray(shard[: cut % (len(shard) + 1)])
    for pos, xor in flips:
        if data:
            data[pos % len(data)] ^= xor
    out = _read_all(bytes(data))
    if not flips and isinstance(out, list):  # a clean cut is whole or an error
        assert out == ["k0", "k1", "k2", "k3"]


yaml_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
yaml_trees = st.recursive(yaml_scalars, lambda kids: st.lists(kids, max_size=4)
                          | st.dictionaries(st.text(max_size=12) | st.sampled_from(
                              ["data", "teacher", "cache", "probe", "lit", "root", "source", "path", "device"]),
                              kids, max_size=4), max_leaves=12)


def _load(tmp_path, text: str | bytes) -> None:
    p = tmp_path / "fuzz.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        load_config(p)
    except VitdistillError as e:
        assert "\n" not in str(e), str(e)


@FUZZ
@given(st.text(max_size=300))
def test_random_yaml_text_is_a_config_or_a_config_error(tmp_path, text):
    _load(tmp_path, text)


@FUZZ
@given(yaml_trees)
def test_random_yaml_documents_are_a_config_or_a_config_error(tmp_path, tree):
    _load(tmp_path, yaml.safe_dump(tree))


@FUZZ
@given(st.binary(max_size=300))
def test_random_config_bytes_are_a_config_or_a_config_error(tmp_path, data):
    _load(tmp_path, data)
