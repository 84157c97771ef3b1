"""Tokenizers: SentencePiece and WordPiece training, HuggingFace tokenizer files, the CLI and its errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from fixtures_text import MORE_WORDS, WORDS

from data_pipeline.errors import UserError
from data_pipeline.formats.text import MASK_ID, SPECIAL_TOKENS, SpecialIds
from data_pipeline.text import tokenizer as tk
from data_pipeline.text.hf_tokenizer import HFTokenizer
from data_pipeline.text.tokenizer_kinds import load_tokenizer, tokenizer_from_copy
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


# ------------------------------------------------------------------ HuggingFace tokenizers, WordPiece


def sentences_of(corpus: Path) -> list[str]:
    return [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def wordpiece(trained: Path) -> Path:
    """`pretrain tokenizer --kind wordpiece` on the shared corpus."""
    out = trained / "wordpiece"
    corpus = str(trained / "corpus" / "corpus.jsonl")
    assert main(["tokenizer", corpus, "--out", str(out), "--vocab-size", "300", "--kind", "wordpiece"]) == 0
    return out


def bpe_json(sentences: list[str], specials: list[str]) -> bytes:
    """A byte-level BPE tokenizer.json (RoBERTa style) with the given special tokens first."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tokenizer = Tokenizer(BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(sentences, trainer)
    return tokenizer.to_str().encode("utf-8")


def unigram_json(sentences: list[str]) -> bytes:
    """A Metaspace Unigram tokenizer.json with BERT-named specials."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import Unigram
    from tokenizers.trainers import UnigramTrainer

    tokenizer = Tokenizer(Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = UnigramTrainer(
        vocab_size=300, special_tokens=list(SPECIAL_TOKENS), unk_token="[UNK]", show_progress=False
    )
    tokenizer.train_from_iterator(sentences, trainer)
    return tokenizer.to_str().encode("utf-8")


def test_wordpiece_training_writes_bert_files(wordpiece: Path) -> None:
    from tokenizers import Tokenizer

    assert sorted(path.name for path in wordpiece.iterdir()) == ["tokenizer.json", "vocab.txt"]
    vocab = (wordpiece / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab[:5] == list(SPECIAL_TOKENS) and len(vocab) == 300
    assert any(piece.startswith("##") for piece in vocab)
    tokenizer = Tokenizer.from_file(str(wordpiece / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 300
    # Lowercased, framed as BERT frames it when used on its own.
    encoded = tokenizer.encode("River STONE", "Light")
    assert encoded.tokens[0] == "[CLS]" and "river" in encoded.tokens and "stone" in encoded.tokens
    assert encoded.tokens[-1] == "[SEP]" and encoded.type_ids[-1] == 1


def test_wordpiece_refuses_sentencepiece_options(trained: Path, tmp_path: Path, capsys) -> None:
    corpus = str(trained / "corpus" / "corpus.jsonl")
    args = ["tokenizer", corpus, "--out", str(tmp_path), "--vocab-size", "300", "--kind", "wordpiece"]
    assert main([*args, "--model-type", "bpe"]) == 2
    assert "--model-type bpe: a SentencePiece option" in capsys.readouterr().err
    assert main([*args[:5], "4", *args[6:]]) == 2
    assert "--vocab-size 4" in capsys.readouterr().err


def test_load_tokenizer_picks_by_path(trained: Path, wordpiece: Path, tmp_path: Path) -> None:
    spm_dir = trained / "tok"
    assert load_tokenizer(str(spm_dir)).kind == "sentencepiece"
    assert load_tokenizer(str(spm_dir / tk.MODEL_FILE)).files() == {
        tk.MODEL_FILE: (spm_dir / tk.MODEL_FILE).read_bytes()
    }
    from_dir = load_tokenizer(str(wordpiece))
    from_json = load_tokenizer(str(wordpiece / "tokenizer.json"))
    assert from_dir.kind == from_json.kind == "wordpiece"
    assert from_dir.sha256 == hashlib.sha256((wordpiece / "tokenizer.json").read_bytes()).hexdigest()
    assert from_dir.files() == {
        "tokenizer.json": (wordpiece / "tokenizer.json").read_bytes(),
        "vocab.txt": (wordpiece / "vocab.txt").read_bytes(),
    }
    # A BERT directory with vocab.txt only: the same pieces and ids as the tokenizer.json.
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_bytes((wordpiece / "vocab.txt").read_bytes())
    from_vocab = load_tokenizer(str(tmp_path / "bert"))
    text = sentences_of(trained / "corpus" / "corpus.jsonl")[:20]
    assert from_vocab.kind == "wordpiece" and from_vocab.encode(text) == from_json.encode(text)
    missing = rf"--tokenizer {tmp_path}/none: no SentencePiece model, tokenizer.json or BERT vocab.txt there"
    with pytest.raises(UserError, match=missing):
        load_tokenizer(str(tmp_path / "none"))


def test_vocab_txt_follows_do_lower_case(wordpiece: Path, tmp_path: Path) -> None:
    (tmp_path / "vocab.txt").write_bytes((wordpiece / "vocab.txt").read_bytes())
    lower = load_tokenizer(str(tmp_path)).encode(["River"])[0]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    cased = load_tokenizer(str(tmp_path)).encode(["River"])[0]
    assert lower != cased


def test_special_ids_come_from_the_tokenizer(trained: Path) -> None:
    text = sentences_of(trained / "corpus" / "corpus.jsonl")
    roberta = HFTokenizer(bpe_json(text, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]), "roberta.json")
    assert roberta.kind == "bpe"
    assert roberta.special_ids == SpecialIds(pad=1, unk=3, cls=0, sep=2, mask=4)
    starts = roberta.word_starts()
    pieces = roberta.pieces()
    assert all(starts[i] == piece.startswith("\u0120") for i, piece in enumerate(pieces) if i > 4)
    assert starts[:5].all()
    unigram = HFTokenizer(unigram_json(text), "unigram.json")
    assert unigram.kind == "unigram" and unigram.special_ids == SpecialIds(0, 1, 2, 3, 4)
    ids = unigram.encode(["river stone"])[0]
    assert bool(unigram.word_starts()[ids[0]])
    with pytest.raises(UserError, match=r"gpt.json: no \[MASK\] token \(looked for \[MASK\], <mask>\)"):
        HFTokenizer(bpe_json(text, ["<s>", "<pad>", "</s>", "<unk>"]), "gpt.json")


def test_hf_encoding_adds_no_specials_and_never_truncates(wordpiece: Path) -> None:
    spec = json.loads((wordpiece / "tokenizer.json").read_text(encoding="utf-8"))
    spec["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    tokenizer = HFTokenizer(json.dumps(spec).encode("utf-8"), "truncating.json")
    ids = tokenizer.encode(["river stone light music window garden paper"])[0]
    assert len(ids) >= 7 and not set(ids) & set(tokenizer.special_ids.ids)
    assert tokenizer.decode(ids) == "river stone light music window garden paper"


def test_unusable_tokenizer_files_are_refused(tmp_path: Path) -> None:
    word_level = {"model": {"type": "WordLevel", "vocab": {"[UNK]": 0}, "unk_token": "[UNK]"}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(word_level))
    with pytest.raises(UserError, match=r"tokenizer.json: model type 'WordLevel' is not supported"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match=r"broken.json: not a tokenizer.json"):
        load_tokenizer(str(tmp_path / "broken.json"))
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(UserError, match=r"vocab.txt: a BERT vocab.txt needs \[PAD\]"):
        load_tokenizer(str(tmp_path / "vocab.txt"))
    with pytest.raises(UserError, match=r"kind 'bert' is not one of"):
        tokenizer_from_copy("bert", b"", "manifest")
