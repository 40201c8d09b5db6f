"""DDP, FSDP2 (uneven and empty shards) and DCP round trips, 2 processes on gloo."""
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from tests import dist_worker

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_fsdp2_and_dcp(tmp_path):
    """Runs every scenario in tests/dist_worker.py; a failing assertion in any rank fails here."""
    mp.spawn(dist_worker.run, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
