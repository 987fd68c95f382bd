import os
import sys

import pytest
import torch

from ratel.runtime import checked_lanes

sys.path.insert(0, os.path.dirname(__file__))

torch.set_num_threads(min(torch.get_num_threads(), 4))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def checked_compute():
    """With RATEL_CHECK_STREAMS=1, every test's kernels are stamped for the copy lanes' ordering checks
    (ratel/runtime/checked_lanes.py)."""
    if not checked_lanes.checking():
        yield
        return
    with checked_lanes.ComputeAccesses():
        yield
