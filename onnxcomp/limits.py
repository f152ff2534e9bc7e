"""Size limits on what onnxcomp makes up itself (generated validation/gate inputs), checked
before any allocation so that a hostile or mistaken shape ends in one line, not numpy's
"array is too big" or an attempt to allocate terabytes."""

from __future__ import annotations

import math

from onnxcomp.errors import InputError

# One generated input may take at most this many bytes (its float64 draw takes twice as much
# for float32 inputs while it is made). Real models' inputs are far smaller: a 1x3x1024x1024
# float32 image is 12 MB.
GENERATED_INPUT_LIMIT = 2**30


def check_generated_size(name: str, shape, dtype) -> None:
    """Refuse to generate an input of `shape` and numpy `dtype` over GENERATED_INPUT_LIMIT bytes,
    e.g. "input 'x': a generated input of shape 9223372036854775807x1x28x28 (float32) is too large
    (2.3e+22 bytes, limit 1 GiB); give its size with --dim NAME=SIZE or --shape NAME=1x3x224x224,
    or pass inputs as .npz"."""
    import numpy as np

    dims = [int(d) for d in shape]
    itemsize = max(np.dtype(dtype).itemsize, 1)  # object (strings): counted as 8 bytes a pointer
    nbytes = math.prod(dims) * itemsize  # Python ints: no overflow whatever the dims
    if nbytes > GENERATED_INPUT_LIMIT:
        text = "x".join(map(str, dims)) or "scalar"
        raise InputError(f"input {name!r}: a generated input of shape {text} ({np.dtype(dtype).name}) is too large "
                         f"({nbytes:.3g} bytes, limit {GENERATED_INPUT_LIMIT // 2**30} GiB); give its size with "
                         "--dim NAME=SIZE or --shape NAME=1x3x224x224, or pass inputs as .npz")
