"""The compile backend's batches of small tensors (``masked_optim.batches``) against the reference:
many small tensors of several kinds in one group, each kind stepped as one concatenated tensor."""
import pytest
import torch

from masked_optim import MaskedAdamW, batches
from tests.tolerances import assert_close

# small 1-D and 2-D tensors (a transposed one: another dense layout), single elements, one
# empty and two too large to batch; fp32 and bf16 params mixed (two batches per group)
SHAPES = ((7,), (300,), (1,), (1,), (64, 3), (3, 50), (5000,), (0,), (batches.MAX_BATCHED_NUMEL + 1,), (200, 100))
DTYPES = (torch.float32, torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.float32,
          torch.bfloat16, torch.float32, torch.float32, torch.float32)


def _params(gen):
    params = []
    for shape, dtype in zip(SHAPES, DTYPES):
        p = torch.randn(shape, generator=gen).to(dtype)
        if shape == (3, 50):
            p = p.t().contiguous().t()  # dense, column-major
        params.append(p.requires_grad_())
    return params


def _twins(**options):
    gen = torch.Generator().manual_seed(0)
    ours = _params(gen)
    ref = [p.detach().clone().requires_grad_() for p in ours]
    return ours, ref, MaskedAdamW(ours, lr=1e-2, backend="compile", **options), MaskedAdamW(ref, lr=1e-2, backend="torch", **options)


def _spy(monkeypatch):
    """The member counts of every batch the backend steps."""
    seen = []
    gather = batches.gather

    def recording(flat, batch_list):
        seen.extend(len(b.members) for b in batch_list)
        return gather(flat, batch_list)

    monkeypatch.setattr(batches, "gather", recording)
    return seen


CASES = {
    "dense": dict(),
    "select_tensor_scope": dict(density=0.3, anchor_decay=3.0, protect_strength=1.0),
    "select_group_scope": dict(density=0.4, scope="group", importance="taylor"),
    "protect_tensor_scope": dict(density=0.6, mask="protect", importance="magnitude", maximize=True),
    "bf16_importance_skip": dict(density=0.5, importance_dtype="bfloat16", nonfinite="skip"),
    "select_blocks_group_scope": dict(density=0.3, gate_block=16, scope="group"),
    "protect_blocks": dict(density=0.6, mask="protect", gate_block=4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_small_tensors_match_the_reference(case, monkeypatch):
    seen = _spy(monkeypatch)
    ours, ref, opt, ref_opt = _twins(**CASES[case])
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        for k, (p, q) in enumerate(zip(ours, ref)):
            g = (torch.randn(p.shape, generator=gen) * torch.exp(torch.randn(p.shape, generator=gen))).to(p.dtype)
            if step == 3 and g.numel() > 10:
                g.view(-1)[3] = float("nan")
            late = k == 1 and step < 2  # a grad that appears late: its step count differs from its kind's
            p.grad, q.grad = (None, None) if late else (g, g.clone())
        if step == 2:
            opt.consolidate()
            ref_opt.consolidate()
        if step == 4:  # user masks on some members: another kind
            for k in (0, 4):
                mask = torch.rand(ours[k].shape, generator=gen) < 0.6
                opt.set_mask(ours[k], mask)
                ref_opt.set_mask(ref[k], mask.clone())
        opt.step()
        ref_opt.step()
        for p, q in zip(ours, ref):
            assert_close(p.detach(), q.detach(), f"param at step {step}")
    for p, q in zip(ours, ref):
        for key, value in ref_opt.state[q].items():
            mine = opt.state[p][key]
            if key in ("threshold", "step", "importance_step", "user_mask") or not torch.is_tensor(value):
                assert torch.equal(torch.as_tensor(mine), torch.as_tensor(value)), key
            else:
                assert_close(mine, value, key)
    assert opt.mask_stats() == ref_opt.mask_stats()
    assert seen and max(seen) >= 3, seen  # the small fp32 tensors did step as batches


def test_group_keeps_only_equal_keys_of_two_or_more():
    keys = ["a", None, "b", "a", "c", "b", None, "a"]
    sizes = [3, 1, 4, 5, 9, 2, 6, 7]
    found = batches.group(keys, sizes, units=[[0], [3], [7], [2, 5]])
    assert [b.members for b in found] == [[0, 3, 7], [2, 5]]
    assert [b.sizes for b in found] == [[3, 5, 7], [4, 2]]
    assert [b.shared_gate for b in found] == [False, True]
    assert found[0].numel == 15


def test_gather_and_scatter_round_trip():
    flat = [tuple(torch.randn(n) if j != 5 else None for j in range(8)) for n in (3, 1, 5)]
    batch = batches.group(["k"] * 3, [3, 1, 5], units=[])[0]
    (inputs,) = batches.gather(flat, [batch])
    assert inputs[5] is None
    for j in (0, 1, 2):
        assert torch.equal(inputs[j], torch.cat([f[j] for f in flat]))
    for j in batches.WRITTEN:
        inputs[j].mul_(2)
    expected = [[x.clone() * (2 if j in batches.WRITTEN else 1) if x is not None else None for j, x in enumerate(f)] for f in flat]
    batches.scatter(flat, batch, inputs)
    for f, e in zip(flat, expected):
        for x, y in zip(f, e):
            assert (x is None and y is None) or torch.equal(x, y)


def test_element_thresholds_expand_each_members_threshold():
    batch = batches.group(["k"] * 3, [2, 1, 3], units=[[0], [1], [2]])[0]
    gates = [torch.tensor([5]), torch.tensor(7), torch.tensor([9])]
    assert batches.element_thresholds(gates, batch).tolist() == [5, 5, 7, 9, 9, 9]


@pytest.mark.parametrize("sizes", [[3], [5, 7], [16384, 16384, 1, 16383], [100] * 700, [40000, 2, 3]])
def test_chunks_cover_the_members_in_runs_below_the_cat_chunk(sizes):
    chunks = batches._chunks(sizes)
    assert chunks[0][0] == 0 and chunks[0][2] == 0 and chunks[-1][1] == len(sizes) and chunks[-1][3] == sum(sizes)
    for (first, last, begin, end), following in zip(chunks, chunks[1:] + [None]):
        assert last > first and end - begin == sum(sizes[first:last])
        assert end - begin < batches.CAT_CHUNK or last == first + 1
        if following is not None:
            assert following[0] == last and following[2] == end
            assert end - begin + sizes[last] >= batches.CAT_CHUNK  # a run takes all it can


def test_gather_of_many_chunks():
    sizes = [5000] * 20 + [1]
    flat = [tuple(torch.randn(n) for _ in range(8)) for n in sizes]
    batch = batches.group(["k"] * len(sizes), sizes, units=[])[0]
    assert len(batch.chunks) > 3
    (inputs,) = batches.gather(flat, [batch])
    for j in range(8):
        assert torch.equal(inputs[j], torch.cat([f[j] for f in flat]))
