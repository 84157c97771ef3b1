"""Small synthetic shard directories (real tar shards, manifest and SentencePiece model) for tests."""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from data_pipeline.formats.location import file_sha256
from data_pipeline.formats.manifest import FORMAT_NAME, MANIFEST_NAME
from data_pipeline.formats.text import SEP_ID, SPECIAL_TOKENS, Example, write_shard

_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


def _lexicon(rng: np.random.Generator, words: int = 400) -> list[str]:
    return ["".join(rng.choice(_LETTERS, rng.integers(2, 11))) for _ in range(words)]


def generate_text(seed: int, sentences: int = 600, sample: int = 0) -> list[str]:
    """Sentences of Zipf-distributed words of the lexicon of ``seed`` (rare words split into pieces)."""
    lexicon = _lexicon(np.random.default_rng(seed))
    rng = np.random.default_rng([seed, sample])
    ranks = np.minimum(rng.zipf(1.3, size=sentences * 12), len(lexicon)) - 1
    lengths = rng.integers(4, 20, sentences)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [" ".join(lexicon[r] for r in ranks[bounds[i] : bounds[i + 1]]) + "." for i in range(sentences)]


def spm_model_bytes(sentences: Iterable[str], vocab_size: int) -> bytes:
    """A real SentencePiece unigram model of ``sentences`` with the BERT specials at ids 0-4."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece=SPECIAL_TOKENS[0],
        unk_piece=SPECIAL_TOKENS[1],
        bos_piece=SPECIAL_TOKENS[2],
        eos_piece=SPECIAL_TOKENS[3],
        control_symbols=[SPECIAL_TOKENS[4]],
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


@functools.lru_cache(maxsize=8)
def train_tokenizer(vocab_size: int = 320, seed: int = 0) -> bytes:
    """A real SentencePiece unigram model with the BERT specials at ids 0-4 (cached per process)."""
    return spm_model_bytes(generate_text(seed), vocab_size)


def _token_stream(processor: spm.SentencePieceProcessor, seed: int, objective: str) -> np.ndarray:
    """Encoded synthetic documents; ``none`` data carries [SEP] at document ends like packed content."""
    ids = processor.encode(generate_text(seed, sentences=400, sample=1))
    parts = [np.asarray(sentence, dtype=np.int64) for sentence in ids]
    if objective == "none":
        parts = [np.append(part, SEP_ID) if i % 7 == 6 else part for i, part in enumerate(parts)]
    return np.concatenate(parts)


def make_examples(count: int, stream: np.ndarray, seq_len: int, objective: str, seed: int) -> list[Example]:
    """``count`` examples cut from ``stream``, lengths at most ``seq_len`` with framing, some short."""
    rng = np.random.default_rng(seed)
    pairs = objective != "none"
    budget = seq_len - (3 if pairs else 2)
    examples = []
    cursor = 0
    for _ in range(count):
        content = budget if rng.random() > 0.2 else int(rng.integers(2, budget + 1))
        if cursor + content > len(stream):
            cursor = 0
        tokens = stream[cursor : cursor + content]
        cursor += content
        if pairs:
            cut = int(rng.integers(1, content))
            examples.append(Example(tokens[:cut], tokens[cut:], int(rng.integers(0, 2))))
        else:
            examples.append(Example(tokens, tokens[:0], 0))
    return examples


def uneven_sizes(total: int, parts: int, rng: np.random.Generator) -> list[int]:
    """Split ``total`` into ``parts`` different positive sizes (when ``total >= parts``)."""
    weights = rng.uniform(0.3, 1.7, parts)
    sizes = np.maximum(1, np.floor(weights / weights.sum() * total)).astype(int)
    sizes[np.argmax(sizes)] += total - sizes.sum()
    return [int(size) for size in sizes]


def _write_split(
    root: Path,
    split: str,
    examples: list[Example],
    shards: int,
    vocab_size: int,
    chunk_sequences: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    entries, start = [], 0
    for index, size in enumerate(uneven_sizes(len(examples), shards, rng)):
        name = f"{split}-{index:06d}.tar"
        with open(root / name, "wb") as handle:
            stats = write_shard(
                handle,
                name,
                f"{split}-{index:06d}",
                examples[start : start + size],
                vocab_size,
                chunk_sequences,
            )
        entries.append(stats.to_json())
        start += size
    return {
        "samples": sum(entry["samples"] for entry in entries),
        "tokens": sum(entry["tokens"] for entry in entries),
        "shards": entries,
    }


def make_shard_dir(
    tmp_path: Path,
    n_train: int = 512,
    n_val: int = 96,
    n_shards: int = 4,
    seq_len: int = 64,
    objective: str = "nsp",
    vocab_size: int = 320,
    seed: int = 0,
    chunk_sequences: int = 16,
    name: str = "data",
) -> Path:
    """Write ``tmp_path/name`` with train/val shards of uneven sizes, a manifest and ``tokenizer/spm.model``.

    Args:
        tmp_path: Parent directory.
        n_train: Train samples, spread unevenly over ``n_shards`` shards.
        n_val: Validation samples, over ``max(1, n_shards // 2)`` shards.
        n_shards: Train shard count.
        seq_len: Model sequence length including framing.
        objective: ``nsp``, ``sop`` or ``none``.
        vocab_size: Requested SentencePiece vocabulary (the manifest records the size obtained).
        seed: Seeds the tokenizer, the text and the shard sizes.
        chunk_sequences: Sequences per tar chunk (small, so that shards have several chunks).
        name: Directory name under ``tmp_path``.
    """
    root = Path(tmp_path) / name
    (root / "tokenizer").mkdir(parents=True, exist_ok=True)
    model_bytes = train_tokenizer(vocab_size, seed)
    (root / "tokenizer" / "spm.model").write_bytes(model_bytes)
    processor = spm.SentencePieceProcessor(model_proto=model_bytes)
    actual_vocab = processor.get_piece_size()
    stream = _token_stream(processor, seed, objective)
    rng = np.random.default_rng(seed)
    splits = {
        split: _write_split(
            root,
            split,
            make_examples(count, stream, seq_len, objective, seed + offset),
            shards,
            actual_vocab,
            chunk_sequences,
            rng,
        )
        for split, count, shards, offset in (
            ("train", n_train, n_shards, 10),
            ("val", n_val, max(1, n_shards // 2), 20),
        )
    }
    manifest = {
        "format": FORMAT_NAME,
        "splits": splits,
        "tokenizer": {
            "path": "tokenizer/spm.model",
            "sha256": file_sha256(str(root / "tokenizer" / "spm.model")),
            "vocab_size": actual_vocab,
            "special_ids": {token: index for index, token in enumerate(SPECIAL_TOKENS)},
        },
        "seq_len": seq_len,
        "objective": objective,
        "seed": seed,
        "documents": {"read": n_train + n_val, "kept": n_train + n_val, "rejected": {}},
    }
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    return root
