"""A teacher's identity (its path slug, fingerprint and preprocessing: what addresses a feature cache)
without building it, from a memo under ``cache.root``; this module imports neither torch nor timm.

Building a teacher to learn its identity (import torch and timm, create the model, load its weights,
sha256 them) costs seconds, and a re-run whose caches are all there needs nothing else from it. So the
first build writes ``CACHE_ROOT/teachers/<slug>-<hash>.json``, keyed by

- the whole ``teacher`` config (its checkpoint path made absolute), this Python's prefix and the
  installed torch and timm versions (they decide a random initialisation and the preprocessing), and
  :data:`MEMO_VERSION` (bump it when :meth:`Teacher.fingerprint` or the preprocessing changes);
- the files the weights were read from (a packaged teacher's file, ``teacher.checkpoint``), each with
  its size and modification time in nanoseconds: replacing or editing a weights file misses the memo,
  and the teacher is built (and its weights hashed) again.

Only teachers that name the files their weights come from are memoised (``Teacher.weights_files``
not None: the packaged teachers, timm models from a checkpoint file or randomly initialised); weights
downloaded from a hub are built every time. The shard tasks, which build the teacher anyway, check that
its fingerprint is the plan's (:func:`vitdistill.extract.extract_shard`)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from importlib import metadata
from typing import TYPE_CHECKING, Any

from vitdistill.cache import fs
from vitdistill.config import TeacherConfig
from vitdistill.errors import DataError

if TYPE_CHECKING:
    from vitdistill.models.teachers import Teacher

MEMO_VERSION = 1


def teacher_slug(name: str) -> str:
    """The name made safe for a path component (``open_clip:ViT-B-32/openai`` -> ``open_clip-ViT-B-32-openai``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _memo_key(cfg: TeacherConfig) -> dict[str, Any]:
    teacher = cfg.model_dump(mode="json")
    if cfg.checkpoint:
        teacher["checkpoint"] = os.path.abspath(cfg.checkpoint)
    return {"memo": MEMO_VERSION, "teacher": teacher, "python": sys.prefix,
            "versions": {d: _version(d) for d in ("torch", "timm")}}


def memo_url(cfg: TeacherConfig, root: str) -> str:
    digest = hashlib.sha256(json.dumps(_memo_key(cfg), sort_keys=True).encode()).hexdigest()
    return fs.join(root, "teachers", f"{teacher_slug(str(cfg.name))}-{digest[:16]}.json")


def _stat(path: str) -> dict[str, Any] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def recall(cfg: TeacherConfig, root: str) -> dict[str, Any] | None:
    """The memoised identity ``{"slug", "fingerprint", "data_config"}``, or None (no memo, another key,
    or a weights file that is gone or changed)."""
    try:
        memo = fs.read_json(memo_url(cfg, root))
    except (FileNotFoundError, DataError):
        return None
    try:
        if memo["key"] != json.loads(json.dumps(_memo_key(cfg))):
            return None
        if any(_stat(f["path"]) != f for f in memo["files"]):
            return None
        identity = memo["identity"]
        return {k: identity[k] for k in ("slug", "fingerprint", "data_config")}
    except (KeyError, TypeError):  # not a memo this code wrote: build the teacher, write it anew
        return None


def remember(cfg: TeacherConfig, root: str, teacher: Teacher, identity: dict[str, Any]) -> None:
    """Write the memo of a teacher that names its weights files (``teacher.weights_files`` not None)."""
    if teacher.weights_files is None:
        return
    files = [_stat(os.path.abspath(p)) for p in teacher.weights_files]
    if any(f is None for f in files):
        return
    fs.write_json_atomic(memo_url(cfg, root), {"key": _memo_key(cfg), "files": files, "identity": identity})


def forget(url: str) -> None:
    """Delete the memo at ``url`` (one found stale: the next plan builds the teacher)."""
    store, path = fs.get_fs(url)
    try:
        store.rm(path)
    except FileNotFoundError:
        pass


def teacher_identity(cfg: TeacherConfig, root: str) -> dict[str, Any]:
    """``{"slug", "fingerprint", "data_config"}`` of the teacher ``cfg`` builds: from its memo under ``root``
    when the memo is valid, else by building the teacher (then memoised)."""
    identity = recall(cfg, root)
    if identity is not None:
        return identity
    from vitdistill.models.teachers import create_teacher

    teacher = create_teacher(cfg)
    identity = {"slug": teacher.slug, "fingerprint": teacher.fingerprint(), "data_config": teacher.data_config}
    remember(cfg, root, teacher, identity)
    return identity
