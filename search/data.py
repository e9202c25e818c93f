"""What the search reads besides the parent's weights: a text corpus, and the parent loaded for distillation.

A corpus is a folder holding `train.txt.xz` and `validation.txt.xz`: xz-compressed UTF-8 text, documents
joined by DOCUMENT_SEPARATOR (the bundled demo's corpus, demo/corpus/, is one). `load_parent` is the setup
`tessera optimize` and `tessera fuse` share: the parent frozen in float32, its tokenizer, both splits as
token streams.
"""

from __future__ import annotations

import lzma
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from tessera.config import ArchConfig
from tessera.errors import UserError, UserFileNotFound
from tessera.runtime.loader import load_model
from tessera.runtime.model import Model
from tessera.runtime.sampling import load_tokenizer

DOCUMENT_SEPARATOR = "<|endoftext|>"
SPLITS = ("train", "validation")


def split_file(split: str, corpus: str | Path) -> Path:
    path = Path(corpus) / f"{split}.txt.xz"
    if not path.is_file():
        raise UserFileNotFound(
            f"{path}: no such file (a corpus folder holds train.txt.xz and validation.txt.xz: xz-compressed UTF-8 text)"
        )
    return path


def check_corpus(corpus: str | Path) -> Path:
    """`corpus` if it holds both splits (checked before a long run starts)."""
    for split in SPLITS:
        split_file(split, corpus)
    return Path(corpus)


def read_corpus(split: str, corpus: str | Path) -> str:
    path = split_file(split, corpus)
    try:
        return lzma.decompress(path.read_bytes()).decode()
    except (lzma.LZMAError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not xz-compressed UTF-8 text ({e})") from None


def encode_split(tok: Tokenizer, split: str, corpus: str | Path, eos_token_ids: tuple[int, ...] = ()) -> np.ndarray:
    """The split as one token stream, documents separated by a token: DOCUMENT_SEPARATOR's where the tokenizer has
    it (the demo's, GPT-2's, Qwen's), else the model's first end-of-sequence id (Llama-3's <|end_of_text|>,
    Mistral's </s>). uint16 for vocabularies that fit (the demo's 8k), int32 for the rest (Llama-3's 128k)."""
    separator = tok.token_to_id(DOCUMENT_SEPARATOR)
    if separator is None and eos_token_ids:
        separator = eos_token_ids[0]
    if separator is None:
        raise UserError(
            f"the tokenizer has no {DOCUMENT_SEPARATOR!r} token and the model no eos_token_id: no token can separate "
            "the corpus's documents"
        )
    ids: list[int] = []
    for enc in tok.encode_batch(read_corpus(split, corpus).split(DOCUMENT_SEPARATOR)):
        ids.extend(enc.ids)
        ids.append(separator)
    return np.asarray(ids, dtype=np.uint16 if max(tok.get_vocab_size(), separator + 1) <= 2**16 else np.int32)


@dataclass
class ParentAndText:
    model: Model  # frozen: the search trains children against it, never it
    train_ids: np.ndarray
    val_ids: np.ndarray


def load_frozen(
    model_dir: str | Path, device: torch.device, dtype: torch.dtype = torch.float32, keep_kv_scales: bool = False
) -> Model:
    """A checkpoint loaded for the search to read, never to train. FP8 KV-cache scales it holds are dropped unless
    kept: they describe its own keys and values, not a child's (ArchConfig.with_blocks drops them too); FFN Fusion
    keeps them (it leaves every attention layer as it is)."""
    model = load_model(model_dir, device, dtype)
    if not keep_kv_scales:
        model.drop_kv_scales()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_parent(
    model_dir: str | Path,
    corpus: str | Path,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    keep_kv_scales: bool = False,
) -> ParentAndText:
    # The text first: a corpus or tokenizer that cannot be read fails before a large parent is loaded.
    tok, eos = load_tokenizer(model_dir), ArchConfig.from_json(model_dir).eos_token_ids
    train, validation = encode_split(tok, "train", corpus, eos), encode_split(tok, "validation", corpus, eos)
    return ParentAndText(load_frozen(model_dir, device, dtype, keep_kv_scales), train, validation)
