"""How the bundled demo parent is made: a small GQA Llama trained on CPU from text that ships with the repo.

Three reproducible steps (`make parent` runs the last two):
1. `snapshot_corpus`: Python's own documentation (`pydoc_data.topics`) and the standard library's source
   (with its docstrings; tests, site-packages and idlelib left out), one document per file or topic,
   split train/validation by a hash of the document name, written xz-compressed to demo/corpus/.
2. `train_tokenizer`: byte-level BPE (Hugging Face `tokenizers`) on the training split.
3. `train_parent`: the model below, trained with tessera's own loop (search/train.py) on random windows,
   evaluated on the validation split; saved as a Hugging Face Llama checkpoint in bfloat16 (≤ 25 MB).
"""

from __future__ import annotations

import json
import lzma
import math
import shutil
import sys
import sysconfig
import tempfile
import time
import zlib
from pathlib import Path

import torch

from tessera.config import ArchConfig, AttentionConfig, BlockConfig, FFNConfig, RopeConfig
from tessera.demo import CORPUS_DIR, PARENT_DIR
from tessera.files import replaced_folder
from tessera.runtime.loader import load_model, save_model
from tessera.runtime.model import Model
from tessera.search.data import DOCUMENT_SEPARATOR, encode_split, read_corpus
from tessera.search.train import TrainConfig, evaluate_lm, fixed_windows, lm_loss, random_windows, train

EOS = DOCUMENT_SEPARATOR  # the tokenizer's special token, and what joins the corpus's documents
VALIDATION_EVERY = 20  # 1 document in 20 (by name hash) is held out

# 8.4M parameters on 2.8M training tokens, trained for under two passes (1.74): validation loss still
# falls at the last evaluation, so the model learns the language of Python source, not the files.
DEMO_ARCH = dict(
    vocab_size=8192,
    hidden_size=256,
    n_heads=8,
    head_dim=32,
    n_kv_heads=4,
    intermediate_size=768,
    n_layers=8,
    max_position_embeddings=1024,
)


def demo_arch(eos_id: int) -> ArchConfig:
    a = DEMO_ARCH
    block = BlockConfig(AttentionConfig("gqa", a["n_kv_heads"]), FFNConfig("swiglu", a["intermediate_size"]))
    return ArchConfig(
        vocab_size=a["vocab_size"],
        hidden_size=a["hidden_size"],
        n_heads=a["n_heads"],
        head_dim=a["head_dim"],
        blocks=(block,) * a["n_layers"],
        rope=RopeConfig(theta=10000.0),
        rms_norm_eps=1e-5,
        tie_embeddings=True,
        max_position_embeddings=a["max_position_embeddings"],
        bos_token_id=eos_id,
        eos_token_ids=(eos_id,),
        dtype="bfloat16",
    )


def _documents() -> list[tuple[str, str]]:
    """(name, text) of every document: pydoc topics, then stdlib modules, in a fixed order."""
    from pydoc_data.topics import topics

    docs = [(f"pydoc:{name}", text) for name, text in sorted(topics.items())]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idle_test", "idlelib", "__pycache__")
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if any(part in skip for part in rel.parts[:-1]) or rel.parts[0] == "pydoc_data":
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append((f"stdlib:{rel.as_posix()}", f"# {rel.as_posix()}\n{text}"))
    return docs


def snapshot_corpus(out: Path = CORPUS_DIR) -> dict[str, int]:
    """Write train.txt.xz / validation.txt.xz (documents joined by EOS) from this Python's stdlib."""
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    for name, text in _documents():
        held_out = zlib.crc32(name.encode()) % VALIDATION_EVERY == 0
        splits["validation" if held_out else "train"].append(text)
    stats = {"python": sys.version.split()[0]}
    for split, texts in splits.items():
        data = EOS.join(texts).encode()
        (out / f"{split}.txt.xz").write_bytes(lzma.compress(data, preset=9))
        stats[f"{split}_documents"] = len(texts)
        stats[f"{split}_bytes"] = len(data)
    (out / "corpus.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def train_tokenizer(out: Path, corpus: Path = CORPUS_DIR, vocab_size: int = DEMO_ARCH["vocab_size"]):
    """Byte-level BPE on the training split; writes tokenizer.json + tokenizer_config.json to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    docs = read_corpus("train", corpus).split(EOS)
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS,
        "eos_token": EOS,
        "unk_token": None,
        "model_max_length": DEMO_ARCH["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return tok


def train_parent(
    out: Path = PARENT_DIR,
    corpus: Path = CORPUS_DIR,
    steps: int = 1200,
    batch_size: int = 16,
    seq_len: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    eval_windows: int = 64,
) -> dict[str, object]:
    """Tokenizer + model from scratch; saves the checkpoint and training.json (losses, perplexities). Everything is
    built in a staging folder beside `out` that replaces it whole at the end: a run stopped midway leaves the old
    parent as it was (its tokenizer with its weights)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.build-") as staging:
        staged = Path(staging) / out.name
        report = _train_parent_into(staged, corpus, steps, batch_size, seq_len, lr, seed, eval_windows)
        with replaced_folder(out) as fresh:
            shutil.copytree(staged, fresh, dirs_exist_ok=True)
    return report


def _train_parent_into(
    out: Path, corpus: Path, steps: int, batch_size: int, seq_len: int, lr: float, seed: int, eval_windows: int
) -> dict[str, object]:
    torch.manual_seed(seed)
    tok = train_tokenizer(out, corpus)
    train_ids, val_ids = encode_split(tok, "train", corpus), encode_split(tok, "validation", corpus)
    arch = demo_arch(tok.token_to_id(EOS))
    model = Model(arch).init_weights(seed=seed).train()
    val = fixed_windows(val_ids, seq_len, eval_windows)
    # Training-loss estimate on a fixed sample of training windows (same size as validation).
    train_eval = next(random_windows(train_ids, eval_windows, seq_len, seed + 1))

    def evaluate() -> dict[str, float]:
        return {"val_loss": evaluate_lm(model, val), "train_eval_loss": evaluate_lm(model, train_eval)}

    cfg = TrainConfig(steps=steps, lr=lr, weight_decay=0.1, eval_every=max(1, steps // 10))
    start = time.time()
    history = train(
        model.named_parameters(),
        lambda w: lm_loss(model, w),
        random_windows(train_ids, batch_size, seq_len, seed),
        cfg,
        evaluate=evaluate,
        desc="demo parent",
    )
    final = history[-1]
    report = {
        "arch": DEMO_ARCH,
        "num_params": arch.num_params(),
        "train_tokens": len(train_ids),
        "validation_tokens": len(val_ids),
        "tokens_seen": steps * batch_size * seq_len,
        "epochs": steps * batch_size * seq_len / len(train_ids),
        "config": {
            "steps": steps,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "lr": lr,
            "seed": seed,
            "eval_windows": eval_windows,
        },
        "train_loss": final["train_eval_loss"],
        "train_perplexity": math.exp(final["train_eval_loss"]),
        "val_loss": final["val_loss"],
        "val_perplexity": math.exp(final["val_loss"]),
        "wall_s": time.time() - start,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "history": [h for h in history if "val_loss" in h],
    }
    save_model(model, out, dtype=torch.bfloat16)
    # The shipped weights are bfloat16: report what they score, loaded back as users load them.
    shipped = load_model(out)
    report["shipped_val_loss"] = evaluate_lm(shipped, val)
    report["shipped_val_perplexity"] = math.exp(report["shipped_val_loss"])
    generation_config = {"bos_token_id": arch.bos_token_id, "eos_token_id": arch.eos_token_ids[0]}
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_training(report, out / "training.png")
    return report


def plot_training(report: dict, path: Path) -> Path:
    """Training- and validation-loss curves from a training.json report, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = report["history"]
    tokens = [h["step"] * report["config"]["batch_size"] * report["config"]["seq_len"] / 1e6 for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    windows = report["config"].get("eval_windows", 64)  # 64: the shipped parent's report predates the field
    ax.plot(tokens, [h["train_eval_loss"] for h in history], "o-", label=f"train ({windows} fixed windows)")
    ax.plot(tokens, [h["val_loss"] for h in history], "s-", label="validation (held-out files)")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"demo parent, {report['num_params'] / 1e6:.1f}M parameters, {report['epochs']:.2f} epochs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
