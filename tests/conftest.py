import pytest
import torch

import peftx  # noqa: F401

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Per-dtype tolerances for products computed in fp32 and returned in the input dtype.
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=6e-2, rtol=2e-2), torch.float64: dict(atol=1e-10, rtol=1e-10)}


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def isolated_rng():
    """Restores torch's, Python's and numpy's global RNG states after the test (Trainer and the
    examples seed them): tests that draw unseeded data later in the session are not shifted."""
    import random

    import numpy as np
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        yield
    random.setstate(py_state)
    np.random.set_state(np_state)
