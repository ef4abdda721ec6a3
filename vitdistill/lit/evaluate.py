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
"""

from __future__ import annotations

import numpy as np


def zeroshot_classifier(prompt_emb: np.ndarray) -> np.ndarray:
    """Average each class's prompt embeddings over templates and re-normalise: (C, T, E) -> (C, E)."""
    mean = prompt_emb.mean(axis=1)  # (C, E)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True).clip(min=1e-12)


def zeroshot_predict(img: np.ndarray, classifier: np.ndarray) -> np.ndarray:
    """(N, E), (C, E) -> (N,) the class whose text embedding is most similar to each image."""
    return np.argmax(img @ classifier.T, axis=1)


def _rank_of_first_positive(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """0-based rank of the best-ranked positive in each row: (R, K) scores, (R, K) bool -> (R,)."""
    best_pos = np.where(positives, scores, -np.inf).max(axis=1, keepdims=True)  # (R, 1)
    return (scores > best_pos).sum(axis=1)  # (R,) items strictly better than the best positive


def recall_at_k(img: np.ndarray, txt: np.ndarray, text_of_image: np.ndarray,
                ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """img (N, E), txt (U, E) distinct texts, text_of_image (N,) ids into txt -> i2t_r{k}, t2i_r{k}.

    Texts no image points at are distractors for image->text and are not queries for text->image.
    """
    sim = img @ txt.T  # (N, U)
    positives = text_of_image[:, None] == np.arange(txt.shape[0])[None, :]  # (N, U)
    i2t_rank = _rank_of_first_positive(sim, positives)  # (N,)
    queried = positives.any(axis=0)  # (U,)
    t2i_rank = _rank_of_first_positive(sim.T[queried], positives.T[queried])  # (U',)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float(np.mean(i2t_rank < k))
        out[f"t2i_r{k}"] = float(np.mean(t2i_rank < k))
    return out
