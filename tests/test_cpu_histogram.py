"""The compile backend's CPU histogram (a C++ loop) against torch.bincount, and its build."""
import os

import pytest
import torch

from masked_optim import cpu_histogram
from masked_optim import threshold as thr


@pytest.mark.parametrize("numel", [0, 1, 2, 3, 4097, thr.NUM_BINS - 1, thr.NUM_BINS, 1 << 20])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "where"])
def test_matches_bincount(numel, masked):
    _check_against_bincount(numel, masked)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "where"])
def test_threads_split_the_count(threads, masked):
    """Above ``MIN_PARALLEL`` elements, as many threads as torch may use each count a range
    (an odd count: the last range is longer); below it, one thread counts."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert _check_against_bincount(cpu_histogram.MIN_PARALLEL * 2 + 3 * 64 + 5, masked) == threads
        assert _check_against_bincount(cpu_histogram.MIN_PARALLEL - 1, masked) == 1
    finally:
        torch.set_num_threads(before)


def _check_against_bincount(numel, masked):
    gen = torch.Generator().manual_seed(numel)
    # scores of a real step: few bins hold most elements, runs of equal bins
    bins = thr.score_bins(torch.exp(torch.randn(numel, generator=gen) * 0.5 - 8))
    bins[: numel // 3] = torch.randint(0, thr.NUM_BINS, (numel // 3,), generator=gen, dtype=torch.int32)
    bins[numel // 2 : numel // 2 + 50] = thr.NUM_BINS - 1  # the last bin, in a run
    where = torch.rand(numel, generator=gen) < 0.3 if masked else None
    expected = thr.histogram_of_bins(bins, where)
    got = cpu_histogram.histogram_of_bins(bins, where)
    assert got.dtype == torch.int64 and got.shape == (thr.NUM_BINS,)
    assert torch.equal(got, expected)
    again = torch.full((thr.NUM_BINS,), -1, dtype=torch.int64)  # the counting call itself: its threads
    threads = cpu_histogram._count(bins, None if where is None else where.contiguous(), again)
    assert torch.equal(again, expected)
    return threads


def test_where_of_the_param_shape():
    gen = torch.Generator().manual_seed(1)
    bins = torch.randint(0, thr.NUM_BINS, (37, 11), generator=gen, dtype=torch.int32)
    where = torch.rand(37, 11, generator=gen) < 0.5
    assert torch.equal(cpu_histogram.histogram_of_bins(bins.view(-1), where), thr.histogram_of_bins(bins.view(-1), where))


@pytest.mark.parametrize(
    "bins, where, message",
    [
        (torch.zeros(8, dtype=torch.int64), None, "int32"),
        (torch.zeros(8, 2, dtype=torch.int32).t(), None, "contiguous"),
        (torch.zeros(8, dtype=torch.int32), torch.ones(7, dtype=torch.bool), "with 8 elements"),
        (torch.zeros(8, dtype=torch.int32), torch.ones(8, dtype=torch.int32), "bool"),
    ],
)
def test_bad_input_is_refused(bins, where, message):
    with pytest.raises(ValueError, match=message):
        cpu_histogram.histogram_of_bins(bins, where)


@pytest.mark.parametrize("numel", [5, thr.NUM_BINS + 5], ids=["few", "many"])
def test_out_receives_the_counts(numel):
    """Counts go into ``out`` (a reused buffer's row), replacing whatever it held, and the
    per-thread tables of the large-input path hold nothing over from the call before."""
    gen = torch.Generator().manual_seed(numel)
    rows = torch.full((2, thr.NUM_BINS), 7, dtype=torch.int64)
    for row in rows:
        bins = torch.randint(0, thr.NUM_BINS, (numel,), generator=gen, dtype=torch.int32)
        assert cpu_histogram.histogram_of_bins(bins, out=row).data_ptr() == row.data_ptr()
        assert torch.equal(row, thr.histogram_of_bins(bins))


@pytest.mark.parametrize(
    "out, message",
    [
        (torch.zeros(thr.NUM_BINS, dtype=torch.int32), "int64"),
        (torch.zeros(thr.NUM_BINS - 1, dtype=torch.int64), "of 32768 elements"),
        (torch.zeros(2, thr.NUM_BINS, dtype=torch.int64)[:, 0], "32768"),
        (torch.zeros(thr.NUM_BINS, 2, dtype=torch.int64)[:, 0], "contiguous: False"),
    ],
)
def test_bad_out_is_refused(out, message):
    with pytest.raises(ValueError, match=message):
        cpu_histogram.histogram_of_bins(torch.zeros(8, dtype=torch.int32), out=out)


def test_strided_where():
    """A strided 1-D mask (a view ``reshape`` keeps) is read in its logical order."""
    gen = torch.Generator().manual_seed(2)
    bins = torch.randint(0, thr.NUM_BINS, (1001,), generator=gen, dtype=torch.int32)
    where = (torch.rand(2002, generator=gen) < 0.5)[::2]
    assert not where.is_contiguous()
    assert torch.equal(cpu_histogram.histogram_of_bins(bins, where), thr.histogram_of_bins(bins, where))


def _fresh_build(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_histogram.tempfile, "tempdir", str(tmp_path))
    cpu_histogram._library.cache_clear()


def test_threads_building_at_once(monkeypatch, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    _fresh_build(monkeypatch, tmp_path)
    bins = torch.randint(0, thr.NUM_BINS, (999,), dtype=torch.int32)
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: cpu_histogram.histogram_of_bins(bins), range(4)))
    finally:
        cpu_histogram._library.cache_clear()
    for result in results:
        assert torch.equal(result, thr.histogram_of_bins(bins))
    (directory,) = tmp_path.iterdir()
    assert [p.suffix for p in directory.iterdir()] == [".so"]  # no leftover source or partial file


def test_a_directory_others_can_write_is_refused(monkeypatch, tmp_path):
    _fresh_build(monkeypatch, tmp_path)
    directory = tmp_path / f"masked_optim_{os.getuid()}"
    directory.mkdir(mode=0o777)
    directory.chmod(0o777)
    try:
        with pytest.raises(RuntimeError, match="writable by no one else"):
            cpu_histogram.histogram_of_bins(torch.zeros(4, dtype=torch.int32))
    finally:
        cpu_histogram._library.cache_clear()


def test_a_cxx_that_is_no_program_is_named(monkeypatch, tmp_path):
    _fresh_build(monkeypatch, tmp_path)
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    try:
        with pytest.raises(RuntimeError, match="CXX='/nonexistent/g\\+\\+'"):
            cpu_histogram.histogram_of_bins(torch.zeros(4, dtype=torch.int32))
    finally:
        cpu_histogram._library.cache_clear()
