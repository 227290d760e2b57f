"""targets.py: reading raw target values, and the normalisation the model is trained in."""
import math

import numpy as np

from dgl_crystalframer.targets import Normalizer, to_float


def test_raw_values_that_are_not_numbers_are_none():
    assert to_float("1.5") == 1.5 and to_float(np.float32(2.0)) == 2.0 and to_float(3) == 3.0
    for bad in (None, "", "na", "NaN", "n/a", "inf", "-inf", float("nan"), math.inf, "abc", True):
        assert to_float(bad) is None, bad


def test_normalizer_round_trip_and_constant_targets():
    y = np.array([1.0, 2.0, 4.0])
    n = Normalizer.fit(y)
    assert np.allclose(n.decode(n.encode(y)), y) and np.isclose(n.std, y.std())  # population std
    assert Normalizer.from_dict(n.as_dict()) == n
    assert Normalizer.fit([5.0, 5.0]).std == 1.0  # a constant target would divide by zero
