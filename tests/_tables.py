"""Comparing study tables that real trial bodies computed in different processes."""

import pandas as pd


def assert_real_tables_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Every non-float column identical (ids, text, seeds, counts: nothing lost, duplicated
    or reordered); float columns equal to float32 rounding (rtol 1e-6 = ~16 ulp).

    CPU float kernels can differ by an ulp between processes (vectorised reductions depend
    on buffer alignment and process state): seen once in ~10 full-suite runs, as -15.616527
    vs -15.616528 in one logp_sum. Bit-identical resume is tested with the deterministic
    trial body (tests/test_study.py, tests/test_ray.py).
    """
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    floats = [c for c in a.columns if pd.api.types.is_float_dtype(a[c])]
    others = [c for c in a.columns if c not in floats]
    pd.testing.assert_frame_equal(a[others], b[others], check_exact=True)
    pd.testing.assert_frame_equal(a[floats], b[floats], check_exact=False, rtol=1e-6, atol=1e-9)
