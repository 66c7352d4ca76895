"""Inception Score on hand-made probability tables, ADM's split rule, and an independent KL computation."""
import numpy as np
import pytest
from scipy.special import softmax
from scipy.stats import entropy

from metrics.inception_score import class_probabilities, inception_score


def test_uniform_predictions_score_one():
    mean, std = inception_score(np.full((100, 10), 0.1), split_size=30)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


def test_confident_balanced_predictions_score_the_number_of_classes():
    probs = np.eye(10)[np.arange(1000) % 10]
    assert inception_score(probs)[0] == pytest.approx(10.0)


def test_one_class_only_scores_one():
    probs = np.eye(10)[np.zeros(50, dtype=int)]
    assert inception_score(probs)[0] == pytest.approx(1.0)


def test_splits_are_consecutive_chunks_with_a_short_last_one():
    # ADM: chunks of split_size in file order; 12 rows, size 5 -> scores of rows 0-4, 5-9, 10-11.
    probs = np.concatenate([np.eye(5), np.full((5, 5), 0.2), np.eye(5)[[0, 1]]])
    mean, std = inception_score(probs, split_size=5)
    assert mean == pytest.approx(np.mean([5.0, 1.0, 2.0]))
    assert std == pytest.approx(np.std([5.0, 1.0, 2.0]))


def test_matches_independent_kl_computation():
    rng = np.random.default_rng(0)
    probs = softmax(rng.normal(scale=3.0, size=(40, 7)), axis=1)
    expected = []
    for part in (probs[:16], probs[16:32], probs[32:]):
        marginal = part.mean(axis=0)
        expected.append(np.exp(np.mean([entropy(row, marginal) for row in part])))
    mean, std = inception_score(probs, split_size=16)
    assert mean == pytest.approx(np.mean(expected), rel=1e-10)
    assert std == pytest.approx(np.std(expected), rel=1e-8)


def test_class_probabilities_are_a_softmax():
    logits = np.array([[0.0, np.log(3.0)], [1000.0, 1000.0]], dtype=np.float32)
    probs = class_probabilities(logits)
    np.testing.assert_allclose(probs, [[0.25, 0.75], [0.5, 0.5]], rtol=1e-6)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="2-D"):
        inception_score(np.ones(5))
    with pytest.raises(ValueError, match="split_size"):
        inception_score(np.ones((2, 2)) / 2, split_size=0)
