import os

import pytest
import torch

# Two cores: keep intra-op threads low so parallel test workers and helpers do not thrash.
torch.set_num_threads(max(1, int(os.environ.get("FEWSTEP_TEST_THREADS", "1"))))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
