"""Loader throughput per core and per-sequence mask shares, side by side with HuggingFace's collator.

    python benchmarks/loader.py                   # seq 128 and 512, about a minute on one core
    python benchmarks/loader.py --seconds 0.5     # quicker, noisier

Rows, for each sequence length (all on one core: torch and BLAS limited to one thread):
  ours frame+mask (WWM)      training.masking.frame_examples + mask_batch over 256-sequence batches
  ours frame+mask (token)    the same with whole_word=False
  ours loader, 0 workers     text_loader end to end: chunk read + order + frame + mask + tensors
  HF collator (plain)        DataCollatorForLanguageModeling over pre-framed ids (special mask given)
  HF collator (WWM)          the same with whole_word_mask=True and the tokenizer's offset mapping
The same token ids feed every row: SentencePiece text encoded by a HuggingFace fast tokenizer built
from the SentencePiece model (checked id for id against SentencePiece itself).

The mask-share table shows, per sequence, masked tokens / content tokens. HuggingFace's whole-word
mode finds words by gaps between token offsets; SentencePiece pieces carry their leading space
("▁word"), so there are no gaps and a whole segment counts as one word.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
import torch
from synthetic import generate_text, train_tokenizer, write_text_dir

from data_pipeline.formats.text import CLS_ID, MASK_ID, PAD_ID, SENTENCEPIECE_SPECIAL_IDS, SEP_ID
from training.data.text import text_loader
from training.masking import (
    IGNORE_INDEX,
    MaskingConfig,
    frame_examples,
    mask_batch,
    mask_key,
    masking_vocab,
    word_start_table_from_processor,
)

BATCH = 256
VOCAB = 320


def hf_tokenizer(model: bytes) -> Any:
    """A HuggingFace fast tokenizer with the SentencePiece model's pieces, scores and BERT framing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    processor = spm.SentencePieceProcessor(model_proto=model)
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=1, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def text_pairs(count: int, seq_len: int, seed: int) -> list[tuple[str, str]]:
    """Sentence pairs long enough to fill ``seq_len`` pieces after truncation."""
    sentences = generate_text(0, sentences=count * max(2, seq_len // 12), sample=seed)
    per_side = len(sentences) // (2 * count)
    return [
        (
            " ".join(sentences[2 * i * per_side : (2 * i + 1) * per_side]),
            " ".join(sentences[(2 * i + 1) * per_side : (2 * i + 2) * per_side]),
        )
        for i in range(count)
    ]


def encode(hf: Any, pairs: list[tuple[str, str]], seq_len: int) -> list[dict[str, list[int]]]:
    encoded = hf(
        [a for a, _ in pairs],
        [b for _, b in pairs],
        truncation="longest_first",
        max_length=seq_len,
        padding="max_length",  # the collator pads ids but not offset mappings
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_token_type_ids=True,
    )
    return [{key: encoded[key][i] for key in encoded} for i in range(len(pairs))]


def to_chunk(examples: list[dict[str, list[int]]]) -> tuple[np.ndarray, ...]:
    """Flat content tokens and (start, len_a, len_b) of HF-framed examples, as a shard chunk holds them."""
    parts, len_a, len_b = [], [], []
    for example in examples:
        ids, types = np.array(example["input_ids"]), np.array(example["token_type_ids"])
        content = ~np.isin(ids, [CLS_ID, SEP_ID, PAD_ID])
        parts.append(ids[content])
        len_a.append(int((content & (types == 0)).sum()))
        len_b.append(int((content & (types == 1)).sum()))
    len_a_array, len_b_array = np.array(len_a), np.array(len_b)
    starts = np.concatenate([[0], np.cumsum(len_a_array + len_b_array)[:-1]])
    return np.concatenate(parts).astype(np.uint16), starts, len_a_array, len_b_array


def rate(run: Callable[[int], Any], batches: int, seconds: float) -> tuple[float, float, Any]:
    """Sequences per second of ``run(batch_number)``: from the median and from the fastest call.

    Calls repeat for ``seconds``; the fastest call is the figure least disturbed by other work on a
    shared machine, the median the typical one.
    """
    last = run(0)  # warm up
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        began = time.perf_counter()
        last = run(len(times) % batches)
        times.append(time.perf_counter() - began)
    return BATCH / float(np.median(times)), BATCH / min(times), last


def ours(chunk: tuple[np.ndarray, ...], seq_len: int, model: bytes, whole_word: bool) -> Callable[[int], Any]:
    tokens, starts, len_a, len_b = chunk
    table = word_start_table_from_processor(spm.SentencePieceProcessor(model_proto=model))
    vocab = masking_vocab(table, SENTENCEPIECE_SPECIAL_IDS)
    config, key = MaskingConfig(whole_word=whole_word), mask_key(0, 0, 0)

    def run(number: int) -> tuple[np.ndarray, np.ndarray]:
        rows = slice(number * BATCH, (number + 1) * BATCH)
        special = SENTENCEPIECE_SPECIAL_IDS
        framed = frame_examples(tokens, starts[rows], len_a[rows], len_b[rows], seq_len, special)
        positions = np.arange(number * BATCH, (number + 1) * BATCH)
        return mask_batch(framed.input_ids, positions, key, vocab, config)

    return run


def hf_collator(hf: Any, examples: list[dict[str, list[int]]], whole_word: bool) -> Callable[[int], Any]:
    from transformers import DataCollatorForLanguageModeling

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # WWM turns off random replacement and says so
        collator = DataCollatorForLanguageModeling(
            hf, whole_word_mask=whole_word, pad_to_multiple_of=8, seed=0
        )
    keep = ("input_ids", "special_tokens_mask") + (("offset_mapping",) if whole_word else ())
    trimmed = [{key: example[key] for key in keep} for example in examples]

    def run(number: int) -> Any:
        return collator(trimmed[number * BATCH : (number + 1) * BATCH])

    return run


def loader_rate(seq_len: int, seconds: float) -> tuple[float, float]:
    """text_loader end to end with no workers (one process) on a freshly written shard dir."""
    with tempfile.TemporaryDirectory() as tmp:
        data = write_text_dir(Path(tmp), samples=8192, seq_len=seq_len, vocab_size=VOCAB)
        loader = text_loader(str(data), global_batch_size=BATCH, micro_batch_size=BATCH, num_workers=0)
        iterator = iter(loader)

        def step(_: int) -> Any:
            loader.step_done()
            return next(iterator)

        median, best, _ = rate(step, 1, seconds)
        return median, best


def shares(input_ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per sequence: masked tokens / content tokens (framing and padding excluded)."""
    content = ~np.isin(input_ids, [PAD_ID, CLS_ID, SEP_ID, MASK_ID])
    return (labels != IGNORE_INDEX).sum(axis=1) / np.maximum(
        1, (content | (labels != IGNORE_INDEX)).sum(axis=1)
    )


def share_row(name: str, values: np.ndarray, mask_prob: float) -> str:
    p5, p50, p95 = np.percentile(values, [5, 50, 95])
    outside = np.mean(np.abs(values - mask_prob) > 0.05)
    return (
        f"  {name:<26}{values.mean():>7.3f}{values.std():>7.3f}{p5:>7.3f}{p50:>7.3f}{p95:>7.3f}"
        f"{np.mean(values == 0):>9.1%}{outside:>10.1%}"
    )


def bench(seq_len: int, seconds: float, hf: Any, model: bytes) -> None:
    examples = encode(hf, text_pairs(4 * BATCH, seq_len, seed=seq_len), seq_len)
    chunk = to_chunk(examples)
    batches = len(examples) // BATCH
    print(f"\nseq_len {seq_len}: sequences/s on one core (batch {BATCH})")
    print(f"  {'':<26}{'median':>12}{'fastest':>12}")
    results: dict[str, Any] = {}
    for name, run in (
        ("ours frame+mask (WWM)", ours(chunk, seq_len, model, True)),
        ("ours frame+mask (token)", ours(chunk, seq_len, model, False)),
        ("HF collator (plain)", hf_collator(hf, examples, False)),
        ("HF collator (WWM)", hf_collator(hf, examples, True)),
    ):
        median, best, results[name] = rate(run, batches, seconds)
        print(f"  {name:<26}{median:>12,.0f}{best:>12,.0f}")
    median, best = loader_rate(seq_len, seconds)
    print(f"  {'ours loader, 0 workers':<26}{median:>12,.0f}{best:>12,.0f}")
    print(f"per-sequence masked share (mask_prob 0.15), last batch of {BATCH}")
    print(f"  {'':<26}{'mean':>7}{'std':>7}{'p5':>7}{'p50':>7}{'p95':>7}{'none':>9}{'|d|>0.05':>10}")
    for name in (
        "ours frame+mask (WWM)",
        "ours frame+mask (token)",
        "HF collator (plain)",
        "HF collator (WWM)",
    ):
        output = results[name]
        if isinstance(output, tuple):
            masked, labels = output
        else:
            masked, labels = output["input_ids"].numpy(), output["labels"].numpy()
            # HF replaced selected tokens; restore the originals so content is counted once.
            masked = np.where(labels != IGNORE_INDEX, labels, masked)
        print(share_row(name, shares(masked, labels), 0.15))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measured row")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = train_tokenizer(VOCAB, 0)
    hf = hf_tokenizer(model)
    text = " ".join(generate_text(0, 50, sample=9))
    same = hf(text, add_special_tokens=False)["input_ids"] == spm.SentencePieceProcessor(
        model_proto=model
    ).encode(text)
    print(f"HF fast tokenizer ids equal SentencePiece ids: {same}")
    for seq_len in args.seq_lens:
        bench(seq_len, args.seconds, hf, model)


if __name__ == "__main__":
    main()
