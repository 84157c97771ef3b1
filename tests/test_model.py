"""The BERT model against transformers' BERT, its options and the FLOP/MFU math."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from data_pipeline.errors import UserError
from training.flops import bert_train_flops_per_sequence, mfu, peak_flops, peak_flops_for_gpu
from training.models.bert import BertForPreTraining, save_hf_pretrained
from training.models.bert_config import BERT_SIZES, BertConfig, ModelConfigError, bert_config

VOCAB = 101
SEQ = 16


def small_config(**overrides: object) -> BertConfig:
    """A BERT small enough for sub-second tests, with two heads of width 16."""
    values: dict[str, object] = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 32,
    }
    values.update(overrides)
    return bert_config(None, VOCAB, **values)


def make_model(**overrides: object) -> BertForPreTraining:
    torch.manual_seed(0)
    return BertForPreTraining(small_config(**overrides))


def make_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Three sequences, two of them padded, with two segments, a few MLM labels and NSP labels."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (3, SEQ), generator=generator)
    attention_mask = torch.ones(3, SEQ, dtype=torch.long)
    attention_mask[0, 11:] = 0
    attention_mask[2, 6:] = 0
    input_ids[attention_mask == 0] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, 4:] = 1
    token_type_ids[attention_mask == 0] = 0
    labels = torch.full_like(input_ids, -100)
    for row, column in [(0, 1), (0, 7), (1, 3), (1, 14), (2, 2), (2, 5)]:
        labels[row, column] = int(torch.randint(5, VOCAB, (1,), generator=generator))
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "labels": labels,
        "next_sentence_label": torch.tensor([0, 1, 1]),
    }


def transformers_twin(model: BertForPreTraining) -> nn.Module:
    """The transformers model of the same config, loaded strictly from our state_dict, in eval mode."""
    config = transformers.BertConfig(**model.hf_config(), attn_implementation="eager")
    architecture = getattr(transformers, model.hf_config()["architectures"][0])
    twin = architecture(config)
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin.eval()


@pytest.mark.parametrize("next_sentence_head", [True, False])
def test_state_dict_names_and_shapes_equal_transformers(next_sentence_head: bool) -> None:
    model = make_model(next_sentence_head=next_sentence_head)
    config = transformers.BertConfig(**model.hf_config())
    reference = (transformers.BertForPreTraining if next_sentence_head else transformers.BertForMaskedLM)(
        config
    )
    ours = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    theirs = {name: tuple(tensor.shape) for name, tensor in reference.state_dict().items()}
    assert ours == theirs
    assert model.num_parameters() == reference.num_parameters()


def test_logits_and_loss_equal_transformers_with_padding() -> None:
    model = make_model().eval()
    twin = transformers_twin(model)
    batch = make_batch()
    with torch.no_grad():
        ours = model(**batch)
        theirs = twin(**batch)
    masked = batch["labels"] != -100
    assert ours.prediction_logits.shape == (int(masked.sum()), VOCAB)
    torch.testing.assert_close(ours.prediction_logits, theirs.prediction_logits[masked], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        ours.seq_relationship_logits, theirs.seq_relationship_logits, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=1e-6)


def test_full_logits_without_labels_equal_transformers() -> None:
    model = make_model().eval()
    twin = transformers_twin(model)
    batch = {key: value for key, value in make_batch().items() if key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        ours = model(**batch)
        theirs = twin(**batch)
    assert ours.loss is None and ours.mlm_count is None
    assert ours.prediction_logits.shape == (3, SEQ, VOCAB)
    torch.testing.assert_close(ours.prediction_logits, theirs.prediction_logits, atol=1e-5, rtol=0)


def test_mlm_only_model_equals_transformers_masked_lm() -> None:
    model = make_model(next_sentence_head=False).eval()
    twin = transformers_twin(model)
    batch = make_batch()
    del batch["next_sentence_label"]
    with torch.no_grad():
        ours = model(**batch)
        theirs = twin(**batch)
    masked = batch["labels"] != -100
    torch.testing.assert_close(ours.prediction_logits, theirs.logits[masked], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=1e-6)
    assert ours.nsp_loss is None and ours.seq_relationship_logits is None


def test_counts_and_losses_add_up() -> None:
    model = make_model().eval()
    batch = make_batch()
    with torch.no_grad():
        out = model(**batch)
    targets = batch["labels"][batch["labels"] != -100]
    assert int(out.mlm_count) == targets.numel() == 6
    assert int(out.mlm_correct) == int((out.prediction_logits.argmax(-1) == targets).sum())
    assert int(out.nsp_count) == 3
    predicted = out.seq_relationship_logits.argmax(-1)
    assert int(out.nsp_correct) == int((predicted == batch["next_sentence_label"]).sum())
    torch.testing.assert_close(out.loss, out.mlm_loss + out.nsp_loss)


def test_batch_without_masked_positions_has_zero_mlm_loss_not_nan() -> None:
    batch = make_batch()
    batch["labels"].fill_(-100)
    out = make_model()(**batch)
    assert int(out.mlm_count) == 0 and out.prediction_logits.shape == (0, VOCAB)
    assert out.mlm_loss.item() == 0.0
    out.loss.backward()  # still differentiable through the NSP head


def test_next_sentence_label_without_head_is_refused() -> None:
    with pytest.raises(ValueError, match="next_sentence_head=False"):
        make_model(next_sentence_head=False)(**make_batch())


def test_decoder_shares_storage_with_word_embeddings() -> None:
    model = make_model()
    embeddings = model.bert.embeddings.word_embeddings.weight
    decoder = model.cls.predictions.decoder
    assert decoder.weight is embeddings
    assert decoder.weight.data_ptr() == embeddings.data_ptr()
    assert decoder.bias is model.cls.predictions.bias
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model(**make_batch()).loss.backward()
    optimizer.step()
    assert torch.equal(decoder.weight, model.bert.embeddings.word_embeddings.weight)


def test_initialisation_follows_transformers() -> None:
    model = make_model(hidden_size=256, num_attention_heads=4, intermediate_size=256)
    embeddings = model.bert.embeddings.word_embeddings.weight
    assert torch.count_nonzero(embeddings[model.config.pad_token_id]) == 0
    assert abs(model.bert.encoder.layer[0].intermediate.dense.weight.std().item() - 0.02) < 0.002
    assert torch.count_nonzero(model.bert.encoder.layer[1].attention.self.query.bias) == 0
    assert torch.count_nonzero(model.cls.predictions.bias) == 0
    assert torch.equal(model.bert.embeddings.LayerNorm.weight, torch.ones(256))


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    plain = make_model().train()
    checkpointed = make_model(activation_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    batch = make_batch()
    for model in (plain, checkpointed):
        torch.manual_seed(7)  # the same dropout masks in both; recompute must reproduce them
        model(**batch).loss.backward()
    for (name, ours), (_, reference) in zip(checkpointed.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(ours.grad, reference.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_pre_layernorm_variant_trains_and_is_not_exportable() -> None:
    model = make_model(pre_layernorm=True).train()
    assert "bert.encoder.LayerNorm.weight" in model.state_dict()
    out = model(**make_batch())
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad is not None
    with pytest.raises(ModelConfigError, match="pre_layernorm"):
        model.hf_config()


def test_exported_directory_loads_in_transformers(tmp_path: Path) -> None:
    model = make_model().eval()
    save_hf_pretrained(model, tmp_path / "export")
    loaded = transformers.BertForPreTraining.from_pretrained(tmp_path / "export", attn_implementation="eager")
    batch = make_batch()
    with torch.no_grad():
        ours = model(**batch)
        theirs = loaded.eval()(**batch)
    masked = batch["labels"] != -100
    torch.testing.assert_close(ours.prediction_logits, theirs.prediction_logits[masked], atol=1e-5, rtol=0)


def test_bert_config_sizes_and_overrides() -> None:
    config = bert_config("mini", 500, hidden_dropout_prob=0.0, num_hidden_layers=None)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (256, 4, 1024)
    assert config.hidden_dropout_prob == 0.0 and config.vocab_size == 500
    assert bert_config(None, 500).hidden_size == 768
    assert BERT_SIZES["large"]["num_hidden_layers"] == 24


def test_bert_config_unknown_size_names_it_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown BERT size 'huge'; choose one of tiny, mini, small"):
        bert_config("huge", 100)
    with pytest.raises(UserError, match="huge"):
        bert_config("huge", 100)


def test_bert_config_bad_fields_are_named() -> None:
    with pytest.raises(ModelConfigError, match=r"unknown BERT config field\(s\) \['hiden_size'\]"):
        bert_config("tiny", 100, hiden_size=64)
    with pytest.raises(ModelConfigError, match="hidden_size 100 is not divisible by num_attention_heads 3"):
        bert_config("tiny", 100, hidden_size=100, num_attention_heads=3)
    with pytest.raises(ModelConfigError, match="hidden_act 'swish'"):
        bert_config("tiny", 100, hidden_act="swish")


def test_train_flops_equal_a_count_of_the_model_weights() -> None:
    config = small_config()
    model = BertForPreTraining(config)
    encoder_weights = sum(m.weight.numel() for m in model.bert.encoder.modules() if isinstance(m, nn.Linear))
    head = model.cls.predictions
    mlm_weights = head.transform.dense.weight.numel() + head.decoder.weight.numel()
    sentence_weights = model.bert.pooler.dense.weight.numel() + model.cls.seq_relationship.weight.numel()
    seq_len, masked = 128, 0.15
    attention = 3 * 4 * seq_len * seq_len * config.hidden_size * config.num_hidden_layers
    expected = 6 * (encoder_weights * seq_len + mlm_weights * masked * seq_len + sentence_weights) + attention
    assert bert_train_flops_per_sequence(config, seq_len, masked) == pytest.approx(expected, rel=1e-12)


def test_train_flops_of_bert_base_are_the_known_figure() -> None:
    # BERT-base, seq 128: 6 * 84.9e6 encoder weights * 128 = 6.52e10, attention 3 * 4 * 128^2 * 768 * 12
    # = 1.81e9, MLM head on 19.2 positions 6 * 24.0e6 * 19.2 = 2.77e9: 6.98e10 in all.
    flops = bert_train_flops_per_sequence(bert_config("base", 30522), 128)
    assert flops == pytest.approx(6.98e10, rel=2e-3)


@pytest.mark.parametrize(
    ("name", "dtype", "peak"),
    [
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
        ("NVIDIA H100 80GB HBM3", torch.float16, 989e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
        ("NVIDIA H200", torch.bfloat16, 989e12),
        ("NVIDIA H200", torch.float32, None),
        ("Tesla T4", torch.float16, None),
    ],
)
def test_peak_flops_table(name: str, dtype: torch.dtype, peak: float | None) -> None:
    assert peak_flops_for_gpu(name, dtype) == peak


def test_peak_flops_is_none_on_cpu_and_mfu_divides() -> None:
    assert peak_flops("cpu", torch.bfloat16) is None
    assert mfu(494.5e12, 989e12) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="positive"):
        mfu(1.0, 0.0)
