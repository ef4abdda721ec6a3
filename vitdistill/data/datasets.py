"""Image datasets as a registry: ``create_dataset(cfg)``, ``list_datasets()``.

A dataset yields :class:`RawSample` (key, encoded image bytes, optional class and caption)
and reports a fingerprint that changes whenever its content may have changed. Built-ins and image
folders are ingested into webdataset shards (``vitdistill.data.ingest``); existing shards
(``source=wds``) are read as they are.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import stat
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from PIL import Image

from vitdistill.config import DataConfig
from vitdistill.errors import DataError
from vitdistill.registry import Registry
from vitdistill.textfile import decode_text

_FOLDER_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": None, ".gif": None}


@dataclass
class RawSample:
    key: str
    image: bytes  # encoded, format given by ``ext``
    ext: str = "png"
    cls: int | None = None
    txt: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class ImageDataset(ABC):
    """Base class: subclasses set ``name``/``classes`` and implement ``samples`` and ``content``."""

    name: str = ""
    classes: list[str] | None = None

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def samples(self) -> Iterator[RawSample]:
        """Every sample, in a fixed order."""

    @abstractmethod
    def content(self) -> Any:
        """What identifies the content (JSON-serialisable); hashed into the fingerprint."""

    def __iter__(self) -> Iterator[RawSample]:
        for i, s in enumerate(self.samples()):
            if self.cfg.limit is not None and i >= self.cfg.limit:
                return
            yield s

    def fingerprint(self) -> str:
        blob = json.dumps({"name": self.name, "limit": self.cfg.limit, "content": self.content()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


DATASETS: Registry[ImageDataset] = Registry("dataset")


def create_dataset(cfg: DataConfig) -> ImageDataset:
    if cfg.source == "wds":
        raise DataError("data.source=wds reads existing shards directly; there is nothing to ingest")
    return DATASETS.create(cfg.source, cfg=cfg)


def list_datasets(pattern: str = "*") -> list[str]:
    return DATASETS.list(pattern) + (["wds"] if "wds".startswith(pattern.rstrip("*")) else [])


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


@DATASETS.register("digits")
class DigitsDataset(ImageDataset):
    """scikit-learn's bundled handwritten digits: 1,797 real 8x8 grey images, 10 classes."""

    name = "digits"
    classes = [str(d) for d in range(10)]

    def samples(self) -> Iterator[RawSample]:
        from sklearn.datasets import load_digits

        d = load_digits()
        pixels = np.clip(d.images * 16.0, 0, 255).astype(np.uint8)  # (N, 8, 8), values 0..16 -> 0..255
        for i, (img, y) in enumerate(zip(pixels, d.target)):
            yield RawSample(key=f"digits-{i:05d}", image=encode_png(Image.fromarray(img, "L")), cls=int(y))

    def content(self) -> Any:
        from importlib.metadata import version  # not `import sklearn`: 2 s, for a version string

        return {"sklearn": version("scikit-learn").split(".")[0], "n": 1797}


@DATASETS.register("shapes")
class ShapesDataset(ImageDataset):
    """Procedural shapes x colours x textures with captions (see ``vitdistill.data.shapes``)."""

    name = "shapes"

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        from vitdistill.data import shapes

        self._shapes = shapes
        self.classes = list(shapes.CLASSES)

    def samples(self) -> Iterator[RawSample]:
        for s in self._shapes.generate_shapes(self.cfg.num_samples, seed=self.cfg.seed, size=self.cfg.image_size):
            meta = {"shape": s.shape, "colour": s.colour, "texture": s.texture}
            yield RawSample(key=s.key, image=encode_png(s.image), cls=s.label, txt=s.caption, meta=meta)

    def content(self) -> Any:
        return {
            "n": self.cfg.num_samples,
            "seed": self.cfg.seed,
            "size": self.cfg.image_size,
            "version": getattr(self._shapes, "GENERATOR_VERSION", 1),
        }


def read_text(path: str) -> str:
    with open(path, "rb") as f:
        return decode_text(f.read(), path)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return kind
    return "not a regular file"


def sanitize_key(rel_stem: str) -> str:
    """Folder path -> webdataset key: no dots (webdataset would split there), no odd characters."""
    return re.sub(r"[^A-Za-z0-9_/-]", "_", rel_stem.replace(os.sep, "/"))


def _csv_captions(path: str) -> dict[str, str]:
    """``file -> caption`` from a ``file,caption`` CSV; binary or malformed content names the file and line."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    try:
        if not reader.fieldnames or not {"file", "caption"} <= set(reader.fieldnames):
            raise DataError(f"{path}: expected a header with columns 'file' and 'caption'")
        caps = {}
        for row in reader:
            if not isinstance(row.get("file"), str) or not isinstance(row.get("caption"), str) or not row["file"]:
                raise DataError(f"{path}:{reader.line_num}: expected a row with a 'file' and a 'caption' value")
            caps[os.path.normpath(row["file"])] = row["caption"]
        return caps
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def _jsonl_captions(path: str) -> dict[str, str]:
    """``file -> caption`` from JSON lines ``{"file": ..., "caption": ...}``, naming the file and line of a bad one."""
    caps = {}
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            file, caption = rec["file"], rec["caption"]
        except (json.JSONDecodeError, KeyError, TypeError):
            file = caption = None
        if not isinstance(file, str) or not isinstance(caption, str) or not file:
            raise DataError(f"{path}:{n}: expected a JSON object with string 'file' and 'caption'")
        caps[os.path.normpath(file)] = caption
    return caps


@DATASETS.register("folder")
class FolderDataset(ImageDataset):
    """ImageFolder layout: ``root/<class>/<image>``; captions from ``<image>.txt`` beside the image
    or from ``root/captions.csv`` (columns ``file,caption``) or ``root/captions.jsonl``
    (``{"file": ..., "caption": ...}``), ``file`` relative to the root.

    Only regular files (or links to them) are read: anything else named like an image (a FIFO would
    block the read forever) is an error, or skipped under ``data.on_error=skip`` (listed in
    ``skipped``). Caption files must be UTF-8 text, and a caption-table row naming no image is an
    error: a typo would otherwise leave an image without a caption without a word. Images without a
    caption are kept; LiT counts them (``captions_missing``) and prompts them with their class name."""

    name = "folder"

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        self.root = os.path.abspath(os.path.expanduser(cfg.path or ""))
        if not os.path.isdir(self.root):
            raise DataError(f"data.path {cfg.path!r}: image folder not found")
        self.classes = sorted(
            d for d in os.listdir(self.root) if os.path.isdir(os.path.join(self.root, d)) and not d.startswith(".")
        )
        for d in self.classes:
            try:
                d.encode("utf-8")
            except UnicodeEncodeError:
                shown = os.fsencode(d).decode("utf-8", "backslashreplace")
                raise DataError(f"data.path {self.root}: class folder name '{shown}' is not valid UTF-8; "
                                "rename it (class names are stored as text)") from None
        self.skipped: list[str] = []
        if not self.classes:
            raise DataError(f"data.path {self.root}: expected one sub-folder per class (ImageFolder layout), found none")
        self._files = self._scan()
        if not self._files:
            raise DataError(f"data.path {self.root}: no images ({', '.join(sorted(_FOLDER_EXTS))}) in the class folders")
        self._captions = self._read_caption_tables()

    def _scan(self) -> list[tuple[str, int]]:
        files = []
        for ci, cname in enumerate(self.classes):
            for dirpath, dirnames, filenames in os.walk(os.path.join(self.root, cname)):
                dirnames.sort()
                for fn in sorted(filenames):
                    if os.path.splitext(fn)[1].lower() not in _FOLDER_EXTS:
                        continue
                    full = os.path.join(dirpath, fn)
                    try:
                        mode = os.stat(full).st_mode  # follows links: a link to an image is an image
                    except OSError:
                        mode, kind = 0, "a broken link"
                    else:
                        kind = _file_kind(mode)
                    if not stat.S_ISREG(mode):
                        if self.cfg.on_error == "error":
                            raise DataError(f"{full}: {kind}, not an image file; remove it, or set data.on_error=skip "
                                            "to skip it")
                        self.skipped.append(os.path.relpath(full, self.root))
                        continue
                    files.append((os.path.relpath(full, self.root), ci))
        return files

    def _read_caption_tables(self) -> dict[str, str]:
        caps: dict[str, str] = {}
        csv_path = os.path.join(self.root, "captions.csv")
        if os.path.isfile(csv_path):
            caps.update(self._checked(csv_path, _csv_captions(csv_path)))
        jsonl_path = os.path.join(self.root, "captions.jsonl")
        if os.path.isfile(jsonl_path):
            caps.update(self._checked(jsonl_path, _jsonl_captions(jsonl_path)))
        return caps

    def _checked(self, table: str, caps: dict[str, str]) -> dict[str, str]:
        """``caps`` if each row names an image of the folder (skipped ones count), else a DataError."""
        known = {os.path.normpath(rel) for rel, _ in self._files} | {os.path.normpath(rel) for rel in self.skipped}
        unmatched = [f for f in caps if f not in known]
        if unmatched:
            raise DataError(f"{table}: {len(unmatched)} of {len(caps)} rows name no image in the class folders "
                            f"(first: {unmatched[0]!r}); 'file' is relative to {self.root}, e.g. {self._files[0][0]!r}")
        return caps

    def samples(self) -> Iterator[RawSample]:
        seen: dict[str, str] = {}
        for rel, ci in self._files:
            stem, ext = os.path.splitext(rel)
            key = sanitize_key(stem)
            if key in seen:
                raise DataError(f"{self.root}: files {seen[key]!r} and {rel!r} map to the same key {key!r}; rename one")
            seen[key] = rel
            full = os.path.join(self.root, rel)
            with open(full, "rb") as f:
                data = f.read()
            fmt = _FOLDER_EXTS[ext.lower()]
            if fmt is None:  # formats webdataset readers do not expect: re-encode as PNG
                try:
                    data, fmt = encode_png(Image.open(io.BytesIO(data)).convert("RGB")), "png"
                except Exception as e:  # PIL raises many types for bad files
                    raise DataError(f"{full}: cannot decode image ({e})") from None
            txt = self._captions.get(os.path.normpath(rel))
            side = os.path.join(self.root, stem + ".txt")
            if txt is None and os.path.isfile(side):
                txt = read_text(side).strip()
            yield RawSample(key=key, image=data, ext=fmt, cls=ci, txt=txt)

    def content(self) -> Any:
        stats = []
        for rel, ci in self._files:
            for path in (rel, os.path.splitext(rel)[0] + ".txt"):
                full = os.path.join(self.root, path)
                if path == rel or os.path.isfile(full):
                    st = os.stat(full)
                    stats.append([path, ci, st.st_size, st.st_mtime_ns])
        for extra in ("captions.csv", "captions.jsonl"):
            p = os.path.join(self.root, extra)
            if os.path.isfile(p):
                st = os.stat(p)
                stats.append([extra, -1, st.st_size, st.st_mtime_ns])
        return {"root": self.root, "files": stats}
