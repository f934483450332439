"""Tests of the sequence tasks of isometry.data (associative recall, patch sequences)."""

import numpy as np
import pytest

from isometry import data


def test_associative_recall_labels_are_the_query_values():
    ds = data.associative_recall(3, n_train=200, n_test=50, pairs=3, keys=5, values=4)
    assert ds.x_train.shape == (200, 7) and ds.x_test.shape == (50, 7) and ds.num_classes == 4
    x = np.concatenate([ds.x_train, ds.x_test])
    y = np.concatenate([ds.y_train, ds.y_test])
    keys, vals, query = x[:, 0:-1:2], x[:, 1:-1:2], x[:, -1]
    assert np.all((keys >= 0) & (keys < 5)) and np.all((vals >= 5) & (vals < 9))
    assert all(len(set(row)) == 3 for row in keys)  # distinct keys in a sequence
    hit = keys == query[:, None]
    assert np.all(hit.sum(axis=1) == 1)  # the query is one of the keys
    np.testing.assert_array_equal(y, vals[hit] - 5)
    # deterministic in the seed; every class occurs
    again = data.associative_recall(3, n_train=200, n_test=50, pairs=3, keys=5, values=4)
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    assert set(np.unique(y)) == {0, 1, 2, 3}


def test_patch_sequence_round_trip():
    x = np.arange(2 * 8 * 8).reshape(2, 8, 8)
    p = data.patch_sequence(x, 4)
    assert p.shape == (2, 4, 16)
    np.testing.assert_array_equal(p[1, 1], x[1, 0:4, 4:8].ravel())  # top-right patch second
    np.testing.assert_array_equal(data.patch_sequence(x, 1)[:, :, 0], x.reshape(2, 64))


def test_sequence_tasks_bad_input():
    with pytest.raises(ValueError, match="keys must be >= pairs"):
        data.associative_recall(pairs=4, keys=3)
    with pytest.raises(ValueError, match="values"):
        data.associative_recall(values=1)
    with pytest.raises(ValueError, match="patch must divide"):
        data.patch_sequence(np.zeros((1, 8, 8)), 3)
