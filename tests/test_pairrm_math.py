"""Model-free tests of PairRM's aggregation and input layout (numbers derived by hand)."""

from types import SimpleNamespace

import numpy as np
import pytest

from prefloop.rankers.pairrm import (
    PAIRRM_MAX_CANDIDATE_TOKENS,
    PAIRRM_MAX_SOURCE_TOKENS,
    PAIRRM_REVISION,
    PairRMResult,
    build_pair,
    candidate_budget,
    competition_ranks,
    preference_probabilities,
    reference_batch_widths,
    result_from_matrix,
    scores_from_matrix,
    stable_order,
)

# M_ij = logit(c_i, c_j); n = 4 so that every mean is exact in float32.
M4 = np.array(
    [[0.0, 1.0, 2.0, 0.0], [0.5, 0.0, -1.0, 0.0], [3.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]],
    dtype=np.float32,
)


def test_scores_divide_by_n_including_the_diagonal():
    # M - M^T rows: [0, .5, -1, 0], [-.5, 0, -1, 0], [1, 1, 0, 1], [0, 0, -1, 0]
    scores = scores_from_matrix(M4)
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(scores, np.array([-0.125, -0.375, 0.75, -0.25], np.float32))
    assert scores.sum() == 0.0


def test_two_candidates_scores_are_half_the_debiased_margin():
    m = np.array([[0.0, 1.5], [-0.5, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(scores_from_matrix(m), [1.0, -1.0])


def test_scores_reject_a_non_square_matrix():
    with pytest.raises(ValueError, match="square"):
        scores_from_matrix(np.zeros((2, 3)))


@pytest.mark.parametrize(
    ("scores", "ranks"),
    [
        ([0.5, 0.5, -1.0], [1, 1, 3]),
        ([-0.2, 0.1, 0.3], [3, 2, 1]),
        ([1.0, 2.0, 2.0, 0.0], [3, 1, 1, 4]),
        ([-0.0, 0.0], [1, 1]),
        ([7.0], [1]),
    ],
)
def test_competition_ranks_share_the_best_rank_on_exact_ties(scores, ranks):
    assert competition_ranks(scores) == ranks


def test_competition_ranks_equal_first_index_in_descending_sort():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scores = rng.integers(-3, 3, size=rng.integers(1, 7)).astype(np.float32) / 4
        descending = sorted(scores.tolist(), reverse=True)
        assert competition_ranks(scores) == [descending.index(s) + 1 for s in scores.tolist()]


def test_competition_ranks_reject_nan():
    with pytest.raises(ValueError, match="non-finite"):
        competition_ranks([0.1, float("nan")])


@pytest.mark.parametrize(
    ("ranks", "order"),
    [
        ([2, 3, 1], [2, 0, 1]),  # distilabel's ranks-1 indexing would give [1, 2, 0]
        ([1, 1, 3], [0, 1, 2]),
        ([3, 1, 1], [1, 2, 0]),
        ([2, 2, 1, 4], [2, 0, 1, 3]),
    ],
)
def test_stable_order_is_best_first_and_keeps_input_order_on_ties(ranks, order):
    assert stable_order(ranks) == order


def test_preference_probabilities_debias_both_orders():
    m = np.array([[0.0, 2.0], [-2.0, 0.0]], dtype=np.float32)
    p = preference_probabilities(m, temperature=2.0)
    sigma2 = 1 / (1 + np.exp(-2.0))
    np.testing.assert_allclose(p, [[0.5, sigma2], [1 - sigma2, 0.5]], rtol=0, atol=1e-15)
    np.testing.assert_allclose(
        preference_probabilities(M4, 1.0) + preference_probabilities(M4, 1.0).T,
        np.ones((4, 4)),
        atol=1e-15,
    )
    with pytest.raises(ValueError, match="temperature"):
        preference_probabilities(m, temperature=0)


def test_result_from_matrix():
    result = result_from_matrix(M4)
    assert isinstance(result, PairRMResult)
    assert result.scores == [-0.125, -0.375, 0.75, -0.25]
    assert result.ranks == [2, 4, 1, 3]
    assert result.order == [2, 0, 3, 1]
    assert result.preferences(2.0)[2, 1] == pytest.approx(1 / (1 + np.exp(-0.5)))


def test_candidate_budget_lends_half_the_unused_source():
    assert candidate_budget(14, 1224, 412) == 412 + 605
    assert candidate_budget(1224, 1224, 412) == 412
    assert candidate_budget(15, 64, 24) == 24 + 24
    # Every pair fits in S + 2C = 2048 ids.
    s, c = PAIRRM_MAX_SOURCE_TOKENS, PAIRRM_MAX_CANDIDATE_TOKENS
    assert max(n + 2 * candidate_budget(n, s, c) for n in range(3, s + 1)) == s + 2 * c == 2048


def test_reference_batch_widths_take_the_longest_source_of_each_chunk():
    assert reference_batch_widths([3, 5, 2, 7, 1], 2) == [5, 5, 7, 7, 1]
    assert reference_batch_widths([3, 5, 2], 1) == [3, 5, 2]
    with pytest.raises(ValueError, match="reference_batch_size"):
        reference_batch_widths([3], 0)


def test_build_pair_layout_and_marker_positions():
    tok = SimpleNamespace(left_id=202, right_id=203)
    pair = build_pair([1, 201, 9, 2], [1, 204, 7, 2], [1, 204, 8, 8, 2], tok)
    assert pair.ids == (1, 201, 9, 2, 1, 202, 7, 2, 1, 203, 8, 8, 2)
    assert (pair.left_pos, pair.right_pos) == (5, 9)


def test_revision_is_a_full_commit_hash():
    assert len(PAIRRM_REVISION) == 40
    int(PAIRRM_REVISION, 16)
