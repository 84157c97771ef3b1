"""Fine-tuning metrics against hand-computed values, edge cases included."""

from __future__ import annotations

import math

import pytest

from training.finetune.metrics import (
    accuracy,
    average_ranks,
    classification_scores,
    entity_scores,
    entity_spans,
    macro_f1,
    mcc,
    pearson,
    regression_scores,
    spearman,
)


def test_accuracy() -> None:
    assert accuracy([0, 1, 1, 2], [0, 1, 2, 2]) == 0.75
    assert accuracy([], []) == 0.0


def test_lengths_must_match() -> None:
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        accuracy([0, 1, 1], [0, 1])


def test_macro_f1_with_a_class_never_predicted() -> None:
    # class 0: P=1 R=1 F1=1; class 1: P=1/3 R=1 F1=0.5; class 2 never predicted: F1=0.
    assert macro_f1([0, 1, 1, 1], [0, 1, 2, 2]) == pytest.approx(0.5)


def test_macro_f1_counts_a_class_only_predicted() -> None:
    # class 0: P=1/2 R=1 F1=2/3; class 1 is only predicted, never gold: F1=0 -> mean 1/3.
    assert macro_f1([0, 1], [0, 0]) == pytest.approx((2 / 3 + 0.0) / 2)


def test_mcc_binary_and_multiclass() -> None:
    # TP=1 FP=1 TN=2 FN=0: (1*2 - 1*0) / sqrt(2*1*3*2).
    assert mcc([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(2 / math.sqrt(12))
    # Confusion rows (gold) [1,0,0] [0,1,0] [0,2,0]: (2*4 - 4) / (sqrt(16-10) * sqrt(16-6)).
    assert mcc([0, 1, 1, 1], [0, 1, 2, 2]) == pytest.approx(4 / math.sqrt(60))
    assert mcc([0, 1, 2], [0, 1, 2]) == pytest.approx(1.0)
    assert mcc([1, 0], [0, 1]) == pytest.approx(-1.0)


def test_mcc_of_constant_predictions_is_zero() -> None:
    assert mcc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0
    assert mcc([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0
    assert mcc([], []) == 0.0


def test_pearson() -> None:
    # dx = [-1, 0, 1], dy = [-7/3, -1/3, 8/3]: 5 / sqrt(2 * 114/9).
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_pearson_and_spearman_of_constants_are_zero() -> None:
    assert pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
    assert spearman([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
    assert pearson([1.0], [1.0]) == 0.0


def test_spearman_with_ties() -> None:
    assert average_ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    # ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4]: 4.5 / sqrt(4.5 * 5).
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, 3], [2, 4, 70]) == pytest.approx(1.0)


def test_entity_spans() -> None:
    assert entity_spans(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    # B- after B- of the same type starts a new entity.
    assert entity_spans(["B-PER", "B-PER"]) == {("PER", 0, 1), ("PER", 1, 2)}
    # I- without B- (at the start, after O, after another type) starts an entity.
    assert entity_spans(["I-PER", "I-PER", "O", "I-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    assert entity_spans(["B-PER", "I-LOC"]) == {("PER", 0, 1), ("LOC", 1, 2)}
    assert entity_spans(["O", "O"]) == set()
    with pytest.raises(ValueError, match="tag 'PER' at position 1"):
        entity_spans(["O", "PER"])


def test_entity_scores() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    # Sentence 1: PER right, LOC missed, one wrong MISC; sentence 2: ORG with the wrong span end.
    guess = [["B-PER", "I-PER", "B-MISC", "O"], ["B-ORG", "I-ORG"]]
    scores = entity_scores(guess, gold)
    assert scores["entity_precision"] == pytest.approx(1 / 3)
    assert scores["entity_recall"] == pytest.approx(1 / 3)
    assert scores["entity_f1"] == pytest.approx(1 / 3)
    perfect = entity_scores(gold, gold)
    assert perfect == {"entity_precision": 1.0, "entity_recall": 1.0, "entity_f1": 1.0}


def test_entity_scores_without_entities_are_zero() -> None:
    assert entity_scores([["O", "O"]], [["O", "O"]])["entity_f1"] == 0.0
    assert entity_scores([["O"]], [["B-PER"]]) == {
        "entity_precision": 0.0,
        "entity_recall": 0.0,
        "entity_f1": 0.0,
    }
    with pytest.raises(ValueError, match="sentence 0: 1 predicted tags for 2 gold tags"):
        entity_scores([["O"]], [["O", "O"]])


def test_score_bundles() -> None:
    assert classification_scores([0, 1], [0, 1]) == pytest.approx(
        {"accuracy": 1.0, "macro_f1": 1.0, "mcc": 1.0}
    )
    scores = regression_scores([1.0, 2.0, 3.0], [1.0, 2.0, 5.0])
    assert scores["mse"] == pytest.approx(4 / 3)
    assert scores["spearman"] == pytest.approx(1.0)
