"""The histogram threshold rule against exact order statistics (kthvalue)."""
import math
import types
import zlib

import pytest
import torch

from masked_optim import functional, scratch
from masked_optim import threshold as thr

N = 200_000


def _scores(kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "lognormal":
        return torch.exp(torch.randn(N, generator=gen) * 1.5 - 4)
    if kind == "lognormal_narrow":
        return torch.exp(torch.randn(N, generator=gen) * 0.8)
    if kind == "pareto":  # heavy tail, alpha 1.1
        return torch.rand(N, generator=gen).clamp_min(1e-12).pow(-1 / 1.1)
    if kind == "cauchy_abs":  # heavy tail from |Cauchy|
        return torch.tan((torch.rand(N, generator=gen) - 0.5) * 3.14159).abs()
    if kind == "fisher":  # squared normal grads of varied scale, as g^2 importance
        return (torch.randn(N, generator=gen) * torch.exp(torch.randn(N, generator=gen))) ** 2
    raise ValueError(kind)


def _bound(density: float) -> float:
    return max(0.1 * density, 0.002)


@pytest.mark.parametrize("kind", ["lognormal", "lognormal_narrow", "pareto", "cauchy_abs", "fisher"])
@pytest.mark.parametrize("density", [0.7, 0.3, 0.1, 0.02, 0.005])
def test_select_density_within_bound(kind, density):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{kind}{density}".encode()))
    scores = _scores(kind, gen)
    bins = thr.score_bins(scores)
    tau = thr.threshold_bin(thr.histogram(scores), density, protect=False)
    realised = thr.gate(bins, tau, protect=False).double().mean().item()
    assert abs(realised - density) <= _bound(density)
    # the exact top-k threshold falls in the threshold bin or its neighbour
    k = N - int(round(density * N)) + 1
    exact = scores.kthvalue(k).values
    assert abs(int(thr.score_bins(exact)) - int(tau)) <= 1


@pytest.mark.parametrize("kind", ["lognormal", "pareto"])
@pytest.mark.parametrize("density", [0.9, 0.5, 0.1])
def test_protect_density_within_bound(kind, density):
    gen = torch.Generator().manual_seed(7)
    anchor = _scores(kind, gen)
    tau = thr.threshold_bin(thr.histogram(anchor), density, protect=True)
    realised = thr.gate(thr.score_bins(anchor), tau, protect=True).double().mean().item()
    assert abs(realised - density) <= _bound(density)


def test_protect_never_freezes_zero_anchor():
    gen = torch.Generator().manual_seed(8)
    anchor = torch.exp(torch.randn(N, generator=gen))
    anchor[: N // 2] = 0.0  # half the layer had no importance at all
    tau = thr.threshold_bin(thr.histogram(anchor), 0.2, protect=True)
    moving = thr.gate(thr.score_bins(anchor), tau, protect=True)
    assert moving[: N // 2].all()
    # the best the rule can do is move only the zeros
    assert moving.double().mean().item() == pytest.approx(0.5)


@pytest.mark.parametrize("density", [0.05, 0.25, 0.5, 0.8])
def test_ties_share_one_gate_closest_to_target(density):
    gen = torch.Generator().manual_seed(9)
    values = torch.tensor([0.0, 1e-6, 3e-3, 0.5, 2.0, 7.0])
    weights = torch.tensor([0.3, 0.25, 0.2, 0.12, 0.08, 0.05])
    scores = values[torch.multinomial(weights, N, replacement=True, generator=gen)]
    tau = thr.threshold_bin(thr.histogram(scores), density, protect=False)
    moving = thr.gate(thr.score_bins(scores), tau, protect=False)
    for value in values:
        tied = moving[scores == value]
        assert tied.all() or not tied.any(), f"tied scores {value} got different gates"
    achievable = [(scores >= v).double().mean().item() for v in values] + [0.0]
    best = min(abs(a - density) for a in achievable)
    assert abs(moving.double().mean().item() - density) == pytest.approx(best)


def test_bins_are_monotone_in_value():
    gen = torch.Generator().manual_seed(10)
    scores = torch.sort(torch.exp(torch.randn(10_000, generator=gen) * 10)).values
    bins = thr.score_bins(scores)
    assert (bins[1:] >= bins[:-1]).all()
    assert thr.score_bins(torch.tensor([0.0, -0.0])).tolist() == [0, 0]


def test_threshold_value_reports_bin_edge():
    assert thr.threshold_value(int(thr.score_bins(torch.tensor(1.0)))) == 1.0
    assert thr.threshold_value(thr.UNKNOWN) != thr.threshold_value(thr.UNKNOWN)  # NaN
    # NUM_BINS (nothing passes: a select unit whose target rounds to no element) is past the
    # finite range: NaN, not the -0.0 its bits would wrap to
    assert math.isnan(thr.threshold_value(thr.NUM_BINS))
    assert thr.threshold_value(int(thr.score_bins(torch.tensor(float("inf"))))) == float("inf")


def _threshold_bin_by_scan(hist: torch.Tensor, density: float, protect: bool) -> torch.Tensor:
    """The rule written out (the yardstick): the first b in [0, NUM_BINS] minimising, in float64,
    |updated(b) - density * total|, where updated(b) counts the bins >= b (select) or < b
    (protect, b >= 1)."""
    counts = hist.to(torch.float64)
    total = counts.sum(-1, keepdim=True)
    below = torch.cat([counts.new_zeros(*counts.shape[:-1], 1), torch.cumsum(counts, -1)], -1)
    updated = below if protect else total - below
    error = (updated - density * total).abs()
    if protect:
        error[..., 0] = float("inf")
    return torch.argmin(error, dim=-1)


def _random_histograms(gen: torch.Generator, rows: int, style: str) -> torch.Tensor:
    hist = torch.zeros(rows, thr.NUM_BINS, dtype=torch.int64)
    for row in hist:
        filled = int(torch.randint(0, 40, (), generator=gen))
        span = {"spread": thr.NUM_BINS, "low": 8, "three": 3}[style]
        bins = torch.randint(0, span, (filled,), generator=gen)
        # counts of 1-2 make candidate thresholds tie often
        row.index_add_(0, bins, torch.randint(1, 3 if style == "three" else 1000, (filled,), generator=gen))
    return hist


@pytest.mark.parametrize("protect", [False, True], ids=["select", "protect"])
@pytest.mark.parametrize("style", ["spread", "low", "three"])
def test_threshold_bin_is_the_rule(style, protect):
    """The binary-search threshold equals the rule's scan on random, empty, sparse and tied
    histograms, one unit at a time and batched, int64 and int32 (the Triton histogram)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{style}{protect}".encode()))
    densities = [1.0, 0.5, 0.25, 1e-6, 0.999] + torch.rand(40, generator=gen).tolist()
    for density in densities:
        hist = _random_histograms(gen, 4, style)
        hist[0] = 0 if density == 1.0 else hist[0]  # an empty unit
        expected = _threshold_bin_by_scan(hist, density, protect)
        assert torch.equal(thr.threshold_bin(hist, density, protect), expected), density
        assert torch.equal(thr.threshold_bin(hist.to(torch.int32), density, protect), expected), density
        for row, want in zip(hist, expected):
            got = thr.threshold_bin(row, density, protect)
            assert got.shape == () and got.dtype == torch.int64 and int(got) == int(want), density


def _next_by_scan(hist: torch.Tensor, density: float, stored: int) -> int:
    """``next_threshold_bin`` for select written out: the rule's threshold, flagged (-2 - b) after
    a step that had none (stored -1) or where the stored one's candidate misses this histogram's
    target by more than half SPEC's bound and more than the rule's threshold does."""
    own = int(_threshold_bin_by_scan(hist, density, False))
    if stored == thr.UNKNOWN:
        return -2 - own
    counts = hist.to(torch.float64)
    total = float(counts.sum())

    def missed(b: int) -> float:
        return abs(float(counts[b:].sum()) - density * total)

    previous = stored if stored >= 0 else -2 - stored
    redo = missed(previous) > 0.5 * _bound(density) * total and missed(previous) > missed(own)
    return -2 - own if redo else own


@pytest.mark.parametrize("style", ["spread", "low", "three"])
def test_next_threshold_flags_a_stored_threshold_that_lagged(style):
    """The threshold stored for the next step equals the rule written out, batched or one unit at a
    time, for stored thresholds near, far from and flagged around the histogram's own; protect
    never flags (its scores, the anchor, do not move)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"next{style}".encode()))
    for density in [0.5, 0.1, 0.01] + torch.rand(20, generator=gen).tolist():
        hist = _random_histograms(gen, 6, style)
        own = _threshold_bin_by_scan(hist, density, False)
        shift = torch.randint(-3, 4, (6,), generator=gen)
        stored = (own + shift).clamp(0, thr.NUM_BINS)
        stored[0] = thr.UNKNOWN
        stored[1] = -2 - stored[1]  # flagged: its candidate is what the check compares
        expected = [_next_by_scan(row, density, int(previous)) for row, previous in zip(hist, stored)]
        assert thr.next_threshold_bin(hist, density, False, stored).tolist() == expected, density
        for row, previous, want in zip(hist, stored, expected):
            assert int(thr.next_threshold_bin(row, density, False, previous)) == want
        protect = thr.next_threshold_bin(hist, density, True, stored)
        assert torch.equal(protect, thr.threshold_bin(hist, density, True))


def test_a_lagging_threshold_is_flagged_and_a_good_one_kept():
    """Scores whose distribution narrows (a young importance average) flag the stored threshold;
    the same scores again keep it."""
    gen = torch.Generator().manual_seed(0)
    wide = thr.histogram(torch.randn(N, generator=gen) ** 2)
    narrow = thr.histogram((torch.randn(N, generator=gen) ** 2 + torch.randn(N, generator=gen) ** 2) / 2)
    stored = thr.threshold_bin(wide, 0.01, False)
    assert int(thr.next_threshold_bin(narrow, 0.01, False, stored)) < 0
    assert int(thr.next_threshold_bin(wide, 0.01, False, stored)) == int(stored)
    assert int(thr.next_threshold_bin(wide, 0.01, False, torch.tensor(thr.UNKNOWN))) == -2 - int(stored)


def test_results_outlive_the_reused_workspace():
    """On the CPU the cumulative sums go into a buffer reused per thread: a result survives the
    next call, and a batch larger than any before grows the buffer."""
    gen = torch.Generator().manual_seed(7)
    small = _random_histograms(gen, 2, "spread")
    first = thr.threshold_bin(small, 0.3, False)
    kept = first.clone()
    big = _random_histograms(gen, 3 + scratch.held(thr.CUMULATIVE, torch.device("cpu"), torch.int64) // thr.NUM_BINS, "low")
    assert torch.equal(thr.threshold_bin(big, 0.3, False), _threshold_bin_by_scan(big, 0.3, False))
    assert torch.equal(first, kept)
    assert torch.equal(thr.threshold_bin(small, 0.3, False), kept)


@pytest.mark.parametrize("layout", ["rows", "separate", "rows-out-of-order"])
@pytest.mark.parametrize("scope", ["tensor", "group"])
def test_units_take_their_thresholds_in_one_batch(layout, scope):
    """``functional._derive`` batches all units' histograms (a view where they are consecutive
    rows of one buffer, as the compile backend counts them) and gives each unit the threshold
    of its own summed histogram."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{layout}{scope}".encode()))
    hist = _random_histograms(gen, 5, "spread")
    counted = hist.clone()
    order = [2, 0, 1, 4, 3] if layout == "rows-out-of-order" else list(range(5))
    pieces = [hist[i] if layout != "separate" else hist[i].clone() for i in order]
    histograms = [lambda piece=piece: piece for piece in pieces]
    tensors = [types.SimpleNamespace(shard_groups=()) for _ in pieces]
    hyper = types.SimpleNamespace(density=0.3, mask="select")
    units = [[i] for i in range(5)] if scope == "tensor" else [list(range(5))]
    got = functional._derive(tensors, units, histograms, hyper)
    want = [thr.threshold_bin(sum(pieces[i] for i in members), 0.3, False) for members in units]
    assert [int(g) for g in got] == [int(w) for w in want]
    assert torch.equal(hist, counted)  # the counts stay as they were
    rows = functional._rows(pieces)
    assert torch.equal(rows, torch.stack(pieces))
    assert (rows.data_ptr() == hist.data_ptr()) == (layout == "rows")


def test_threshold_bin_tie_goes_to_the_lower_threshold():
    hist = torch.zeros(thr.NUM_BINS, dtype=torch.int64)
    hist[[3, 7]] = 1  # two elements: a target of 0.5 or 1.5 is 0.5 off two candidates
    assert int(thr.threshold_bin(hist, 0.25, protect=False)) == 4  # bins >= 4: 1 (not 0)
    assert int(thr.threshold_bin(hist, 0.75, protect=False)) == 0  # all 2 (not 1)
    assert int(thr.threshold_bin(hist, 0.25, protect=True)) == 1  # bins < 1: 0 (not 1), b >= 1
    assert int(thr.threshold_bin(hist, 0.75, protect=True)) == 4  # bins < 4: 1 (not 2)


def test_every_nan_score_lands_in_one_bin_whatever_its_bits():
    """NaN payloads differ between backends and conversions (torch's CPU bf16 NaN is 0xFFFF,
    Triton writes 0x7FC0): every NaN bins to NAN_BIN, above +inf's bin; finite scores and inf
    keep their bit-pattern bins."""
    patterns = torch.tensor([0x7FC00000, -0x00400000, 0x7F800001, 0x7FFFFFFF, -0x00010000], dtype=torch.int32)  # incl. 0xFFC00000, 0xFFFF0000
    nans = patterns.view(torch.float32)
    assert nans.isnan().all()
    bf16_nan = torch.tensor([-1], dtype=torch.int16).view(torch.bfloat16).float()  # 0xFFFF as stored by torch
    scores = torch.cat([nans, bf16_nan, torch.tensor([float("inf"), 1.0, 0.0, 3.5e38])])
    bins = thr.score_bins(scores)
    assert (bins[:6] == thr.NAN_BIN).all()
    assert bins[6:].tolist() == [0x7F80, 0x3F80, 0, (torch.tensor(3.5e38).view(torch.int32).item() >> 16) & 0x7FFF]
    assert thr.NAN_BIN > 0x7F80
