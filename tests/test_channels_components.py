"""The numpy connected-components routine against scipy's on random and structured graphs."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as scipy_components

from graphopt.channels.components import connected_components, unique


def _scipy(n, a, b):
    mat = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    return scipy_components(mat, directed=False)


def _same_partition(l1: np.ndarray, l2: np.ndarray) -> bool:
    pairs = set(zip(l1.tolist(), l2.tolist()))
    return len(pairs) == len(set(l1.tolist())) == len(set(l2.tolist()))


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 60).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=80),
        )
    )
)
def test_matches_scipy_on_random_graphs(case):
    n, edges = case
    a = np.array([e[0] for e in edges], dtype=np.int64)
    b = np.array([e[1] for e in edges], dtype=np.int64)
    count, labels = connected_components(n, a, b)
    ref_count, ref_labels = _scipy(n, a, b)
    assert count == ref_count
    assert _same_partition(labels, ref_labels)
    # numbered in the order of each component's smallest element
    firsts = [int(np.nonzero(labels == k)[0][0]) for k in range(count)]
    assert firsts == sorted(firsts)


def test_long_chains_in_adversarial_order_converge():
    n = 5000
    perm = np.random.default_rng(0).permutation(n)
    a, b = perm[:-1], perm[1:]  # one path visiting the vertices in random order
    count, labels = connected_components(n, a, b)
    assert count == 1 and (labels == 0).all()
    count, labels = connected_components(n + 3, a, b)  # plus three isolated vertices
    assert count == 4 and sorted(np.bincount(labels).tolist()) == [1, 1, 1, n]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-5, 40), max_size=60))
def test_unique_matches_numpy(values):
    a = np.asarray(values, dtype=np.int64)
    got = unique(a)
    np.testing.assert_array_equal(got, np.unique(a))
    assert got.dtype == a.dtype
