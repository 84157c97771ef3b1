"""Synthetic inputs of the benchmarks: Zipf text, a SentencePiece model, text and image shard directories."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import sentencepiece as spm
from PIL import Image

from data_pipeline.formats.images import write_image_shard
from data_pipeline.formats.location import file_sha256
from data_pipeline.formats.manifest import (
    TOKENIZER_COPY,
    build_image_manifest,
    build_manifest,
    document_counts,
    manifest_text,
    tokenizer_entry,
)
from data_pipeline.formats.text import SPECIAL_TOKENS, Example, write_shard

LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


def generate_text(seed: int, sentences: int = 600, sample: int = 0) -> list[str]:
    """Sentences of Zipf-distributed words from a 400-word lexicon of ``seed``.

    Args:
        seed: Picks the lexicon.
        sentences: Number of sentences. Defaults to 600.
        sample: Picks the sentences drawn from the lexicon. Defaults to 0.
    """
    lexicon_rng = np.random.default_rng(seed)
    lexicon = ["".join(lexicon_rng.choice(LETTERS, lexicon_rng.integers(2, 11))) for _ in range(400)]
    rng = np.random.default_rng([seed, sample])
    ranks = np.minimum(rng.zipf(1.3, size=sentences * 12), len(lexicon)) - 1
    bounds = np.concatenate([[0], np.cumsum(rng.integers(4, 20, sentences))])
    return [" ".join(lexicon[r] for r in ranks[bounds[i] : bounds[i + 1]]) + "." for i in range(sentences)]


def train_tokenizer(vocab_size: int, seed: int = 0) -> bytes:
    """A SentencePiece unigram model of :func:`generate_text` with the BERT specials at ids 0-4."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(generate_text(seed)),
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


def write_text_dir(
    root: Path, samples: int, seq_len: int, vocab_size: int, shards: int = 2, chunk_sequences: int = 4096
) -> Path:
    """A text shard directory (train split only) of full-length sentence pairs, as `prepare text` lays it out.

    Args:
        root: Directory to create.
        samples: Train sequences, spread evenly over ``shards``.
        seq_len: Sequence length including framing.
        vocab_size: Requested SentencePiece vocabulary.
        shards: Shard count. Defaults to 2.
        chunk_sequences: Sequences per tar chunk. Defaults to 4096.
    """
    model = train_tokenizer(vocab_size)
    (root / TOKENIZER_COPY).parent.mkdir(parents=True, exist_ok=True)
    (root / TOKENIZER_COPY).write_bytes(model)
    processor = spm.SentencePieceProcessor(model_proto=model)
    stream = np.concatenate([np.asarray(ids, np.int64) for ids in processor.encode(generate_text(0, 400, 1))])
    rng, content = np.random.default_rng(0), seq_len - 3
    examples = []
    for number in range(samples):
        start = number * content % (len(stream) - content)
        cut = int(rng.integers(1, content))
        tokens = stream[start : start + content]
        examples.append(Example(tokens[:cut], tokens[cut:], int(rng.integers(0, 2))))
    entries = []
    for shard, part in enumerate(np.array_split(np.arange(samples), shards)):
        name = f"train-{shard:06d}.tar"
        with open(root / name, "wb") as sink:
            stats = write_shard(
                sink, name, f"train-{shard:06d}", [examples[i] for i in part], processor.get_piece_size(), chunk_sequences
            )
        entries.append(("train", stats.to_json()))
    special_ids = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    tokenizer = tokenizer_entry(file_sha256(str(root / TOKENIZER_COPY)), processor.get_piece_size(), special_ids)
    manifest = build_manifest(entries, document_counts(samples, samples, {}), tokenizer, seq_len, "nsp", 0, {})
    (root / "manifest.json").write_text(manifest_text(manifest), encoding="utf-8")
    return root


class _Photo:
    """A photo-like JPEG of one class: the class's colour channel over a smooth random pattern."""

    def __init__(self, rng: np.random.Generator, label: int, width: int, height: int) -> None:
        pattern = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((width, height))
        pixels = np.asarray(pattern, dtype=np.float32) * 0.5 + rng.normal(0, 8, (height, width, 3))
        pixels[..., label] += 100
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        self.jpeg, self.label = buffer.getvalue(), label
        self.digest = rng.bytes(16)


def write_image_dir(root: Path, images: int, width: int, height: int, classes: int = 3) -> Path:
    """An image shard directory (one train shard of labelled photo-like JPEGs), as `prepare images` lays it out.

    Args:
        root: Directory to create.
        images: Images in the shard.
        width: Image width in pixels.
        height: Image height in pixels.
        classes: Number of classes (one colour channel each, at most 3). Defaults to 3.
    """
    rng = np.random.default_rng(0)
    photos = [_Photo(rng, int(rng.integers(0, classes)), width, height) for _ in range(images)]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "train-000000.tar", "wb") as sink:
        entry = write_image_shard(sink, "train-000000.tar", photos)
    names = [f"class{index}" for index in range(classes)]
    counts = document_counts(images, images, {})
    manifest = build_image_manifest([("train", entry)], counts, names, "classes", max(width, height), 90, 0, {})
    (root / "manifest.json").write_text(manifest_text(manifest), encoding="utf-8")
    return root
