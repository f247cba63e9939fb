"""One torch thread per pytest process: the suite runs on two workers (``-n 2``), one per core; more threads
than cores makes small tensor work several times slower.

Every test also leaves the worker as it found it for the distributed tests that follow: a process group
still initialized after a test fails that test (by name), and the distributed variables Lightning writes
into ``os.environ`` for an in-process DDP run are removed. Left behind, they broke later tests in the same
worker only in full runs (a one-rank fixture found the group taken; launched scripts inherited the port).
"""

import os

import pytest
import torch
import torch.distributed as dist

from tests.helpers import DISTRIBUTED_ENV

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _leave_no_process_group():
    before = {k: os.environ.get(k) for k in DISTRIBUTED_ENV}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail("this test left a torch.distributed process group initialized (Lightning does not destroy "
                    "it): destroy it at the end of the test (tests.helpers.destroy_process_group)")
