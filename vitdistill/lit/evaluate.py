"""LiT evaluation: zero-shot classification from class-name prompts, and image<->text retrieval.

Pure functions of unit-norm embeddings (numpy):

    classifier = zeroshot_classifier(prompt_emb)            # (C, T, E) -> (C, E)
    pred = zeroshot_predict(img, classifier)                # (N,)
    recall_at_k(img, txt, text_of_image, ks=(1, 5, 10))     # {"i2t_r1": ..., "t2i_r1": ...}

Retrieval is over *distinct* texts: duplicates (many images captioned "a photo of a 3") are merged
into one text, so the gallery has no copies of the right answer. Image->text: an image is a hit
at k when its own caption is among the k texts most similar to it (averaged over images).
Text->image: a text is a hit at k when any image captioned with it is among the k images most
similar to it (averaged over distinct texts), the usual rule when a query has several positives.

Retrieval streams: :func:`recall_at_k_chunks` takes the images in chunks (twice: once for each
text's best positive, once to rank it), so memory is O(chunk x U), never the (N, U) similarity
matrix; :func:`recall_at_k` is the same over arrays already in memory.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

SIM_ELEMENTS = 2**24  # similarity entries per image chunk in retrieval (64 MiB of float32)


def zeroshot_classifier(prompt_emb: np.ndarray) -> np.ndarray:
    """Average each class's prompt embeddings over templates and re-normalise: (C, T, E) -> (C, E)."""
    mean = prompt_emb.mean(axis=1)  # (C, E)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True).clip(min=1e-12)


def zeroshot_predict(img: np.ndarray, classifier: np.ndarray) -> np.ndarray:
    """(N, E), (C, E) -> (N,) the class whose text embedding is most similar to each image."""
    return np.argmax(img @ classifier.T, axis=1)


ImageChunks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


def recall_at_k(img: np.ndarray, txt: np.ndarray, text_of_image: np.ndarray,
                ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """img (N, E), txt (U, E) distinct texts, text_of_image (N,) ids into txt -> i2t_r{k}, t2i_r{k}.

    Texts no image points at are distractors for image->text and are not queries for text->image.
    """
    step = max(1, SIM_ELEMENTS // max(1, txt.shape[0]))
    return recall_at_k_chunks(lambda: ((img[i:i + step], text_of_image[i:i + step]) for i in range(0, len(img), step)),
                              txt, ks)


def recall_at_k_chunks(chunks: ImageChunks, txt: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """:func:`recall_at_k` with the images given as ``chunks()``, an iterable of (img (n, E), text_of_image (n,))
    that is read twice; each chunk costs one (n, U) similarity block."""
    u = txt.shape[0]
    i2t_hits = np.zeros(len(ks), dtype=np.int64)
    best = np.full(u, -np.inf, dtype=np.float64)  # (U,) each text's most similar image among its own
    queried = np.zeros(u, dtype=bool)  # (U,) texts some image points at
    n = 0
    for img, toi in chunks():
        sim = img @ txt.T  # (n, U)
        own = sim[np.arange(len(toi)), toi]  # (n,) each image against its own caption
        rank = (sim > own[:, None]).sum(axis=1)  # (n,) texts strictly more similar than the right one
        i2t_hits += (rank[:, None] < np.asarray(ks)[None, :]).sum(axis=0)
        np.maximum.at(best, toi, own)
        queried[toi] = True
        n += len(toi)
    t2i_rank = np.zeros(u, dtype=np.int64)  # (U,) images strictly more similar than the text's best positive
    for img, _ in chunks():
        t2i_rank += ((img @ txt.T) > best[None, :].astype(img.dtype)).sum(axis=0)
    t2i_rank = t2i_rank[queried]
    out = {}
    for j, k in enumerate(ks):
        out[f"i2t_r{k}"] = float(i2t_hits[j] / n)
        out[f"t2i_r{k}"] = float(np.mean(t2i_rank < k))
    return out
