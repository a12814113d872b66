"""imagene.metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from imagene.metrics import (
    ari,
    gene_pearson,
    mean_pearson,
    mse,
    nmi,
    recall_at_k,
    top_expressed_genes,
    top_variable_genes,
)

# four genes over three spots
Y_TRUE = np.array([[1.0, 1.0, 5.0, 1.0], [2.0, 2.0, 5.0, 2.0], [3.0, 3.0, 5.0, 3.0]])
Y_PRED = np.array([[1.0, 4.0, 1.0, -2.0], [3.0, 4.0, 2.0, -4.0], [2.0, 4.0, 3.0, -6.0]])


def test_gene_pearson_hand_values():
    r = gene_pearson(Y_TRUE, Y_PRED)
    # gene 0: centred (-1, 0, 1) and (-1, 1, 0): r = 1 / sqrt(2 * 2) = 0.5
    # gene 1: constant prediction, gene 2: constant measurement -> undefined (NaN, not 0)
    # gene 3: prediction = -2 * truth -> -1
    np.testing.assert_allclose(r[[0, 3]], [0.5, -1.0], atol=1e-12)
    assert np.isnan(r[1]) and np.isnan(r[2])


def test_gene_pearson_sparse_input_and_float_constant_columns():
    np.testing.assert_allclose(gene_pearson(sp.csr_matrix(Y_TRUE), Y_PRED), gene_pearson(Y_TRUE, Y_PRED))
    # a broadcast float mean is constant even when its column mean is not exactly representable
    truth = np.array([[0.0], [1.0], [3.0], [7.0], [2.0], [5.0], [4.0]])
    pred = np.full_like(truth, 0.1)
    assert np.isnan(gene_pearson(truth, pred)[0])


def test_gene_pearson_and_mse_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        gene_pearson(Y_TRUE, Y_PRED[:, :3])
    with pytest.raises(ValueError, match="same shape"):
        mse(Y_TRUE, Y_PRED[:2])


def test_mean_pearson_skips_undefined_genes():
    assert mean_pearson(Y_TRUE, Y_PRED) == pytest.approx((0.5 - 1.0) / 2)
    assert math.isnan(mean_pearson(Y_TRUE, np.ones_like(Y_TRUE)))


def test_mse_hand_value():
    # squared errors: 0, 1, 4, 9 -> mean 3.5
    assert mse(np.array([[0.0, 1.0], [2.0, 3.0]]), np.array([[0.0, 2.0], [4.0, 6.0]])) == pytest.approx(3.5)


def test_gene_sets_rank_training_genes():
    x = np.array([[0.0, 10.0, 1.0], [4.0, 10.0, 3.0], [8.0, 10.0, 2.0]])
    # variances 10.67, 0, 0.67; means 4, 10, 2
    np.testing.assert_array_equal(top_variable_genes(x, 2), [0, 2])
    np.testing.assert_array_equal(top_expressed_genes(x, 2), [1, 0])
    np.testing.assert_array_equal(top_expressed_genes(sp.csr_matrix(x), 3), [1, 0, 2])


def _shifted_pairs():
    """Queries 0-4 are their partner; queries 5-9 are closer to the NEXT candidate than to their own."""
    ref = np.eye(10)
    query = np.eye(10)
    for i in range(5, 10):
        query[i] = 0.5 * np.eye(10)[i] + np.eye(10)[(i + 1) % 10]
    return query, ref


def test_recall_at_k_hand_values_both_directions():
    query, ref = _shifted_pairs()
    # 10 candidates: 10 % -> k = 1, 15 % -> ceil(1.5) = 2, 20 % -> 2
    assert recall_at_k(query, ref, k_percent=10) == pytest.approx(0.5)  # queries 5-9 rank their partner 2nd
    assert recall_at_k(query, ref, k_percent=15) == pytest.approx(1.0)
    assert recall_at_k(query, ref, k_percent=20) == pytest.approx(1.0)
    # gene -> image: candidate j (5 <= j) is the partner of query j (cos 0.447) but query j-1 points at it (cos 0.894)
    # whenever j-1 >= 5: j = 6..9 miss at k = 1, j = 0..5 hit -> 0.6
    assert recall_at_k(ref, query, k_percent=10) == pytest.approx(0.6)


def test_recall_at_k_ties_score_chance_not_one():
    z = np.ones((10, 3))
    # every candidate ties with the partner: expected recall under random tie-breaking is k / n
    assert recall_at_k(z, z, k_percent=10) == pytest.approx(0.1)
    assert recall_at_k(z, z, k_percent=30) == pytest.approx(0.3)


def test_recall_at_k_is_cosine_and_batch_independent():
    rng = np.random.default_rng(0)
    q, r = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    full = recall_at_k(q, r, k_percent=10)
    assert recall_at_k(q, r, k_percent=10, batch_size=7) == pytest.approx(full)
    assert recall_at_k(3.0 * q, r, k_percent=10) == pytest.approx(full)  # scale-free


@pytest.mark.parametrize("k_percent", [0, -5, 101])
def test_recall_at_k_refuses_bad_cutoffs(k_percent):
    with pytest.raises(ValueError, match="k_percent"):
        recall_at_k(np.eye(4), np.eye(4), k_percent=k_percent)


def test_recall_at_k_refuses_unpaired_or_nan_input():
    with pytest.raises(ValueError, match="same shape"):
        recall_at_k(np.eye(4), np.eye(5)[:, :4], k_percent=10)
    bad = np.eye(4)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(bad, np.eye(4), k_percent=10)


def test_ari_and_nmi_hand_values():
    truth, pred = [0, 0, 1, 1], ["x", "x", "y", "z"]
    # contingency sums: pairs 1; rows 1 + 1 = 2; columns 1; C(4, 2) = 6; expected 2 * 1 / 6
    # ARI = (1 - 1/3) / ((2 + 1) / 2 - 1/3) = 4/7
    assert ari(truth, pred) == pytest.approx(4 / 7)
    # the prediction determines the truth: MI = H(true) = ln 2, H(pred) = 1.5 ln 2 -> NMI = 1 / 1.25
    assert nmi(truth, pred) == pytest.approx(0.8)
    assert ari(["a", "a", "b", "b"], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert nmi(["a", "a", "b", "b"], [0, 1, 0, 1]) == pytest.approx(0.0)


def test_ari_nmi_refuse_missing_or_unpaired_labels():
    with pytest.raises(ValueError, match="missing"):
        ari(["a", None, "b"], [0, 1, 1])
    with pytest.raises(ValueError, match="missing"):
        nmi(["a", float("nan"), "b"], [0, 1, 1])
    with pytest.raises(ValueError, match="same spots"):
        ari(["a", "b"], [0, 1, 1])
