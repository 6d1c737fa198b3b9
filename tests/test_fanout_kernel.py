"""fan_out (CSR expand with a cap): native equals the twin equals a plain loop."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import engine._kernels as native
import engine._kernels_py as twin


def plain(offsets: list[int], values: list[int], cap: int) -> tuple[list[int], list[int]]:
    out, row = [], []
    for i in range(len(offsets) - 1):
        for v in values[offsets[i]:offsets[i + 1]][:cap]:
            out.append(v)
            row.append(i)
    return out, row


@settings(deadline=None, max_examples=200)
@given(lists=st.lists(st.lists(st.integers(-2**63, 2**63 - 1), max_size=6), max_size=20),
       cap=st.integers(0, 8), slack=st.integers(0, 3))
def test_fan_out_equals_a_plain_loop(lists, cap, slack):
    offsets = np.zeros(len(lists) + 1, np.int64)
    offsets[1:] = np.cumsum([len(x) for x in lists]) if lists else []
    values = np.array([v for x in lists for v in x] + [7] * slack, np.int64)
    want = plain(offsets.tolist(), values.tolist(), cap)
    for mod in (native, twin):
        out, row = mod.fan_out(offsets, values, cap)
        assert (out.tolist(), row.tolist()) == want
        assert out.dtype == row.dtype == np.int64


@pytest.mark.parametrize("mod", [native, twin])
@pytest.mark.parametrize("offsets, values, cap, err", [
    ([], [], 1, ValueError),
    ([1, 2], [1, 2], 1, ValueError),        # does not start at 0
    ([0, 2, 1], [1, 2], 1, ValueError),     # decreases
    ([0, 3], [1, 2], 1, ValueError),        # ends past values
    ([0, 1], [1], -1, ValueError),          # negative cap
])
def test_fan_out_rejects_a_malformed_csr(mod, offsets, values, cap, err):
    with pytest.raises(err):
        mod.fan_out(np.array(offsets, np.int64), np.array(values, np.int64), cap)


@pytest.mark.parametrize("mod", [native, twin])
def test_fan_out_wants_int64(mod):
    with pytest.raises(TypeError, match="int64"):
        mod.fan_out(np.array([0, 1], np.int32), np.array([1], np.int64), 1)
