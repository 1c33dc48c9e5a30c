import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _threads():
    # two xdist workers share the two cores: one thread each
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
    yield


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """The session's digits cache (the same path test_digits.py uses: trained once)."""
    from graphopt.zoo import digits

    path = tmp_path_factory.getbasetemp() / "graphopt-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRAPHOPT_CACHE", str(path))
        digits.pretrained_vgg()
        yield path
