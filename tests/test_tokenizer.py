"""SentencePiece training: BERT specials at fixed ids, files written, the CLI and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from fixtures_text import MORE_WORDS, WORDS

from data_pipeline.errors import UserError
from data_pipeline.formats.text import MASK_ID, SPECIAL_TOKENS
from data_pipeline.text import tokenizer as tk
from launch.cli import main

WORDS = [*WORDS, *MORE_WORDS]


def write_corpus(directory: Path, documents: int = 120, seed: int = 0) -> Path:
    """A jsonl file of real-ish documents (sentences of known words, numbers and punctuation)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(documents):
            sentences = [
                " ".join(rng.choice(WORDS, int(rng.integers(4, 12)))).capitalize()
                + f" {rng.integers(0, 2000)}."
                for _ in range(int(rng.integers(3, 10)))
            ]
            handle.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tokenizer")
    corpus = write_corpus(root / "corpus")
    assert main(["tokenizer", str(corpus), "--out", str(root / "tok"), "--vocab-size", "400"]) == 0
    return root


def test_specials_at_fixed_ids_and_files_written(trained: Path) -> None:
    assert (trained / "tok" / tk.MODEL_FILE).is_file() and (trained / "tok" / tk.VOCAB_FILE).is_file()
    processor = tk.load_processor(str(trained / "tok" / tk.MODEL_FILE))
    assert processor.GetPieceSize() == 400
    assert [processor.PieceToId(piece) for piece in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert processor.PieceToId("[MASK]") == MASK_ID
    vocab_head = (trained / "tok" / tk.VOCAB_FILE).read_text(encoding="utf-8").splitlines()[:5]
    assert [line.split("\t")[0] for line in vocab_head] == list(SPECIAL_TOKENS)


def test_special_text_is_not_tokenised_to_special_ids(trained: Path) -> None:
    processor = tk.load_processor(str(trained / "tok" / tk.MODEL_FILE))
    ids = tk.encode_sentences(processor, ["a [MASK] river [CLS] and [SEP] stone [PAD]", "ünïcödé ☃ 42"])
    assert all(token >= len(SPECIAL_TOKENS) for sentence in ids for token in sentence)
    # Byte fallback: characters never seen in training still round-trip instead of becoming [UNK].
    assert processor.Decode(ids[1]) == "ünïcödé ☃ 42"


def test_same_inputs_give_the_same_model(trained: Path, tmp_path: Path) -> None:
    corpus = trained / "corpus" / "corpus.jsonl"
    assert main(["tokenizer", str(corpus), "--out", str(tmp_path), "--vocab-size", "400"]) == 0
    assert (tmp_path / tk.MODEL_FILE).read_bytes() == (trained / "tok" / tk.MODEL_FILE).read_bytes()


def test_bpe_model_type(trained: Path, tmp_path: Path) -> None:
    corpus = trained / "corpus" / "corpus.jsonl"
    args = ["tokenizer", str(corpus), "--out", str(tmp_path), "--vocab-size", "350", "--model-type", "bpe"]
    assert main(args) == 0
    processor = tk.load_processor(str(tmp_path / tk.MODEL_FILE))
    assert tk.special_ids(processor) == {piece: i for i, piece in enumerate(SPECIAL_TOKENS)}


def test_cli_errors_name_the_value(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = str(trained / "corpus" / "corpus.jsonl")
    assert main(["tokenizer", corpus, "--out", str(tmp_path), "--vocab-size", "100000"]) == 2
    assert "lower --vocab-size" in capsys.readouterr().err
    assert (
        main(["tokenizer", str(tmp_path / "none*.jsonl"), "--out", str(tmp_path), "--vocab-size", "400"]) == 2
    )
    assert "matches no file" in capsys.readouterr().err
    assert main(["tokenizer", corpus, "--out", str(tmp_path), "--vocab-size", "10"]) == 2
    assert "--vocab-size 10" in capsys.readouterr().err


def test_model_without_fixed_specials_is_refused(trained: Path, tmp_path: Path) -> None:
    sentences = trained / "plain.txt"
    sentences.write_text("\n".join(f"plain sentence number {i} about a river" for i in range(200)))
    spm.SentencePieceTrainer.train(
        input=str(sentences), model_prefix=str(tmp_path / "plain"), vocab_size=40, minloglevel=2
    )
    processor = tk.load_processor(str(tmp_path / "plain.model"))
    with pytest.raises(UserError, match=r"plain.model: special pieces at .*\[PAD\]"):
        tk.verify_specials(processor, str(tmp_path / "plain.model"))
    with pytest.raises(UserError, match="no SentencePiece model at"):
        tk.resolve_model_path(str(tmp_path / "missing"))


def test_write_sentences_flattens_and_counts(tmp_path: Path) -> None:
    stats = tk.SampleStats()
    with open(tmp_path / "s.txt", "w", encoding="utf-8") as sink:
        tk.write_sentences(["one\ntwo", "", "  ", "x" * 5000], sink, stats)
    lines = (tmp_path / "s.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "one two" and len(lines[1]) == tk.MAX_SENTENCE_BYTES
    assert stats.sentences == 2
