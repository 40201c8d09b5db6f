"""Reused step buffers (``masked_optim.scratch``): one per purpose, device, dtype and thread."""
import threading

import torch

from masked_optim import scratch


def test_a_purpose_reuses_its_memory_and_grows_when_asked_for_more():
    cpu = torch.device("cpu")
    first = scratch.reused("test purpose", cpu, torch.int32, 100)
    again = scratch.reused("test purpose", cpu, torch.int32, 60)
    assert again.numel() == 60 and again.data_ptr() == first.data_ptr()
    other = scratch.reused("another test purpose", cpu, torch.int32, 60)
    wider = scratch.reused("test purpose", cpu, torch.int64, 60)
    assert len({first.data_ptr(), other.data_ptr(), wider.data_ptr()}) == 3
    grown = scratch.reused("test purpose", cpu, torch.int32, 1000)
    assert grown.numel() == 1000 and scratch.held("test purpose", cpu, torch.int32) == 1000
    assert scratch.reused("test purpose", cpu, torch.int32, 10).data_ptr() == grown.data_ptr()


def test_threads_never_share_a_buffer():
    seen = []

    def take():
        seen.append(scratch.reused("threaded test purpose", torch.device("cpu"), torch.float32, 64))

    threads = [threading.Thread(target=take) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    take()
    assert len({buffer.data_ptr() for buffer in seen}) == 3  # (each kept alive by ``seen``)
