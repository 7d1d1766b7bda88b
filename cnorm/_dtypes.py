"""The floating dtypes cnorm computes on, including bfloat16 from ml_dtypes."""

import numpy as np

try:
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # a declared dependency; without it bfloat16 is simply not offered
    BFLOAT16 = None

FLOAT16 = np.dtype(np.float16)
FLOAT32 = np.dtype(np.float32)
FLOAT64 = np.dtype(np.float64)
HALF_DTYPES = tuple(d for d in (FLOAT16, BFLOAT16) if d is not None)
ALL_FLOATS = (*HALF_DTYPES, FLOAT32, FLOAT64)


def is_floating(dtype) -> bool:
    """True for float16/32/64 and bfloat16 (whose NumPy kind is 'V', not 'f')."""
    return dtype.kind == "f" or (BFLOAT16 is not None and dtype == BFLOAT16)
