"""LiT inputs from a feature cache: locked image embeddings paired with texts.

    data = load_lit_data(cache_dir, holdout_combos=True, spill_dir=tmp)
    data.train.embeddings(idx)   # (B, D) float32: rows of the locked image tower's embeddings
    data.train.options        # (N, K) ids into data.texts: the captions a sample may be paired with
    data.prompt_ids           # (C, T) ids into data.texts: class-name prompts for zero-shot

Texts come from the cache's captions (``txt``): a captioned sample's option is its caption (K = 1
when every sample has one). A labelled cache without captions gets CLIP-style captions from its class
names: each sample's K options are its class name in every prompt template, and training draws one
per epoch. Val pairs each sample with option ``i % K`` (fixed, so val loss is comparable across
epochs); test pairs it with the first template, so test retrieval on generated captions is
class-level matching against C texts.

A cache where only some samples have a caption keeps them: the others get their class prompts (K =
T, a caption repeated T times), or, without class names, are left out of LiT. Either way the count
is logged and reported (``captions_missing``, ``captions_missing_dropped``).

The embeddings are read in one pass over the cache. With ``spill_dir`` they stay on disk, a float16
memory map of the whole cache that every split indexes by its ``rows`` (no copy per split, none for
the hold-out), and batches are gathered from it as float32: memory does not grow with N beyond the
per-sample keys, labels and text ids.

Which pairs are positives is decided by ``text_groups``: each distinct text is its own group
when captions come from the cache (so identical captions match each other), and all prompts of a
class form one group when captions are generated (so "a handwritten digit 3." is a positive, not
a negative, for an image paired with "a photo of the digit 3.").

On ``shapes`` caches (meta with colour and shape), samples whose (colour, shape) is in
:data:`~vitdistill.data.shapes.HELDOUT_COMBOS` are removed from train and val, and flagged in test
so that zero-shot accuracy on never-seen pairings is reported on its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitdistill.cache.reader import FeatureCache
from vitdistill.data.shapes import HELDOUT_COMBOS
from vitdistill.errors import DataError

log = logging.getLogger(__name__)

# Prompt templates per dataset source (``manifest["dataset"]["source"]``), CLIP-style; "generic"
# serves any other source. They build captions for caption-less caches and zero-shot classifiers.
PROMPT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "digits": (
        "a photo of the digit {}.",
        "a photo of the number {}.",
        "a handwritten digit {}.",
        "a low resolution image of the digit {}.",
        "a blurry photo of the number {}.",
    ),
    "shapes": (
        "a photo of a {}.",
        "a {} shape.",
        "a drawing of a {}.",
        "a picture of a {}.",
        "a {}.",
    ),
    "generic": (
        "a photo of a {}.",
        "a photo of the {}.",
        "a bad photo of a {}.",
        "a close-up photo of a {}.",
        "an image of a {}.",
    ),
}


def prompt_templates(source: str | None) -> tuple[str, ...]:
    return PROMPT_TEMPLATES.get(source or "generic", PROMPT_TEMPLATES["generic"])


def class_prompts(classes: list[str], templates: tuple[str, ...]) -> list[list[str]]:
    """``[[template.format(name) for template in templates] for name in classes]``, underscores as spaces."""
    return [[t.format(c.replace("_", " ")) for t in templates] for c in classes]


@dataclass
class LitSplit:
    keys: list[str]
    emb: np.ndarray  # (M, D) the whole cache's embeddings (float32, or a float16 memory map); shared by the splits
    rows: np.ndarray  # (N,) int64: this split's rows of ``emb``
    options: np.ndarray  # (N, K) int64 ids into LitData.texts
    cls: np.ndarray | None  # (N,) int64
    heldout: np.ndarray | None  # (N,) bool: (colour, shape) in HELDOUT_COMBOS; None without meta
    meta: list[dict] | None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dim(self) -> int:
        return int(self.emb.shape[1])

    def embeddings(self, idx: np.ndarray | None = None) -> np.ndarray:
        """(len(idx), D) float32: the split's samples ``idx`` (positions in this split; all when None)."""
        rows = self.rows if idx is None else self.rows[np.asarray(idx)]
        return np.asarray(self.emb[rows], dtype=np.float32)

    def fixed_text_ids(self) -> np.ndarray:
        """(N,) the option ``i % K`` of each sample: a fixed pairing for val loss and test retrieval."""
        n, k = self.options.shape
        return self.options[np.arange(n), np.arange(n) % k]


@dataclass
class LitData:
    texts: list[str]  # every distinct text: captions and prompts
    text_groups: np.ndarray  # (U,) int64: texts in one group are interchangeable captions
    train: LitSplit
    val: LitSplit
    test: LitSplit
    classes: list[str] | None
    templates: tuple[str, ...]
    prompt_ids: np.ndarray | None  # (C, T) ids into texts
    source: str
    captions_generated: bool
    removed_heldout: dict[str, int]  # split -> samples dropped for the compositional hold-out
    captions_missing: int = 0  # samples of the cache without a caption, in a cache where others have one
    captions_missing_dropped: int = 0  # of those, left out of LiT (no class names to prompt them with)

    def sizes(self) -> dict[str, int]:
        out = {s: len(getattr(self, s)) for s in ("train", "val", "test")}
        if self.test.heldout is not None:
            out["test_heldout_combos"] = int(self.test.heldout.sum())
        out.update({f"{s}_removed_heldout_combos": n for s, n in self.removed_heldout.items()})
        return out


class _Vocab:
    """Distinct texts in first-seen order, with their ids."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.ids: dict[str, int] = {}

    def id(self, text: str) -> int:
        if text not in self.ids:
            self.ids[text] = len(self.texts)
            self.texts.append(text)
        return self.ids[text]


def heldout_mask(meta: list[dict] | None, combos=HELDOUT_COMBOS) -> np.ndarray | None:
    """(N,) bool, True where a sample's (colour, shape) is a held-out combo; None unless every
    sample has colour and shape attributes."""
    if not meta or not all(isinstance(m, dict) and "colour" in m and "shape" in m for m in meta):
        return None
    return np.array([(m["colour"], m["shape"]) in combos for m in meta], dtype=bool)


def _check_captions(cache_dir: str, keys: list[str], txt: list[str | None]) -> None:
    for key, t in zip(keys, txt):
        if t is not None and not t.strip():
            raise DataError(f"{cache_dir}: sample {key!r} has an empty caption; "
                            "expected non-empty text in its txt field")


def _take(d: dict[str, Any], keep: np.ndarray) -> dict[str, Any]:
    idx = np.flatnonzero(keep)
    out = {}
    for name, v in d.items():
        if v is None or name in ("emb", "layers", "logits", "logits_topk", "logits_idx"):
            out[name] = None
        elif isinstance(v, np.ndarray):
            out[name] = v[idx]
        else:
            out[name] = [v[i] for i in idx]
    return out


def _options(txt: list[str | None] | None, cls: np.ndarray | None, prompt_ids: np.ndarray | None,
             vocab: _Vocab, k: int) -> np.ndarray:
    """(N, K) text ids: a caption repeated K times where a sample has one, else its class's first K prompts.
    K is 1 when every sample has a caption."""
    if txt is not None and all(t is not None for t in txt):
        return np.array([[vocab.id(t)] for t in txt], dtype=np.int64).reshape(-1, 1)  # (N, 1)
    options = prompt_ids[cls, :k].copy()  # (N, K)
    for i, t in enumerate(txt or ()):
        if t is not None:
            options[i] = vocab.id(t)
    return options


def load_lit_data(cache_dir: str, holdout_combos: bool = True, spill_dir: str | None = None) -> LitData:
    fc = FeatureCache.open(cache_dir)
    everything = fc.load(spill_dir=spill_dir)
    emb = everything["emb"]
    everything["rows"] = np.arange(len(emb), dtype=np.int64)
    source = (fc.manifest.get("dataset") or {}).get("source") or "generic"
    templates = prompt_templates(source)
    classes = fc.classes
    has_cls = everything["cls"] is not None
    has_txt = everything["txt"] is not None
    can_prompt = bool(classes) and has_cls
    if not has_txt and not can_prompt:
        raise DataError(f"{cache_dir}: no captions (txt) and no class names with labels (cls); "
                        "LiT needs captions, or class names to build prompts from")
    keep = np.ones(len(emb), dtype=bool)
    missing = dropped = 0
    if has_txt:
        _check_captions(cache_dir, everything["key"], everything["txt"])
        uncaptioned = np.array([t is None for t in everything["txt"]], dtype=bool)
        missing = int(uncaptioned.sum())
        if missing and not can_prompt:
            keep, dropped = ~uncaptioned, missing
            log.warning("LiT: %d of %d samples of %s have no caption and there are no class names to prompt "
                        "them with; they are left out of LiT", missing, len(keep), cache_dir)
        elif missing:
            log.warning("LiT: %d of %d samples of %s have no caption; their class prompts stand in for it",
                        missing, len(keep), cache_dir)
    if has_cls and classes and int(everything["cls"].max()) >= len(classes):
        raise DataError(f"{cache_dir}: a cls label is beyond the {len(classes)} class names in the manifest")
    split_of = np.array(everything["split"])
    raw = {s: _take(everything, (split_of == s) & keep) for s in ("train", "val", "test")}
    for s in ("train", "test"):
        if not len(raw[s]["key"]):
            raise DataError(f"{cache_dir}: split {s!r} has no samples; LiT trains on train and evaluates on test")

    vocab = _Vocab()
    prompts = class_prompts(classes, templates) if can_prompt else None
    prompt_ids = np.array([[vocab.id(p) for p in row] for row in prompts], dtype=np.int64) if prompts else None
    removed: dict[str, int] = {}
    splits: dict[str, LitSplit] = {}
    for name, d in raw.items():
        held = heldout_mask(d["meta"]) if holdout_combos else None
        if held is not None and name != "test":
            removed[name] = int(held.sum())
            d = _take(d, ~held)
            held = np.zeros(len(d["key"]), dtype=bool)
        k = 1 if name == "test" else len(templates)  # test: the first template, a canonical caption
        options = _options(d["txt"] if has_txt else None, d["cls"], prompt_ids, vocab, k)
        splits[name] = LitSplit(keys=d["key"], emb=emb, rows=d["rows"], options=options, cls=d["cls"] if has_cls else None,
                                heldout=held, meta=d["meta"])
    if len(splits["train"]) < 2:
        raise DataError(f"{cache_dir}: {len(splits['train'])} training sample(s) after the hold-out; "
                        "LiT needs at least 2")
    u = len(vocab.texts)
    groups = np.arange(u, dtype=np.int64)  # (U,) every distinct caption is its own group
    if not has_txt:
        groups[prompt_ids] = np.arange(len(prompt_ids))[:, None]  # (U,) a prompt's group is its class
    elif missing and can_prompt:  # prompts stand in for missing captions: a class's prompts are one group
        groups[prompt_ids] = u + np.arange(len(prompt_ids))[:, None]  # (U,) after the captions' groups
    return LitData(texts=vocab.texts, text_groups=groups, train=splits["train"], val=splits["val"], test=splits["test"],
                   classes=classes if has_cls else None, templates=templates, prompt_ids=prompt_ids,
                   source=source, captions_generated=not has_txt, removed_heldout=removed,
                   captions_missing=missing, captions_missing_dropped=dropped)
