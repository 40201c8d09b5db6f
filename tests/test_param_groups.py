"""decay_groups and layerwise_lr_groups: exact membership, lr per depth, and use in optimizers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from masked_optim import MaskedAdamW, decay_groups, layerwise_lr_groups


class MyRMSNorm(nn.Module):  # a custom norm class, as Hugging Face models define them
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.Linear(width, width)
        self.ln_2 = MyRMSNorm(width)
        self.mlp = nn.Linear(width, width, bias=False)


class TinyGPT(nn.Module):
    """GPT-2's names (transformer.wte/wpe/h.N/ln_f, lm_head tied to wte) and a frozen buffer-like param."""

    def __init__(self, layers: int = 3, width: int = 8, vocab: int = 16) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, width), wpe=nn.Embedding(4, width),
            h=nn.ModuleList(Block(width) for _ in range(layers)), ln_f=nn.LayerNorm(width),
        ))
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        self.frozen = nn.Parameter(torch.zeros(3), requires_grad=False)


BLOCK_DECAY = ("attn.weight", "mlp.weight")
BLOCK_NO_DECAY = ("ln_1.weight", "ln_1.bias", "attn.bias", "ln_2.weight")


def names_of(model: nn.Module, params: list) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def test_decay_groups_exact_membership():
    model = TinyGPT()
    groups = decay_groups(model, weight_decay=0.1, density=0.3)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(g["density"] == 0.3 for g in groups)
    assert names_of(model, groups[0]["params"]) == [f"transformer.h.{i}.{n}" for i in range(3) for n in BLOCK_DECAY]
    assert names_of(model, groups[1]["params"]) == (
        ["transformer.wte.weight", "transformer.wpe.weight"]  # the tied lm_head appears once, as wte
        + [f"transformer.h.{i}.{n}" for i in range(3) for n in BLOCK_NO_DECAY]
        + ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    )  # the frozen parameter is in neither group


def test_decay_groups_kinds_and_patterns():
    model = TinyGPT(layers=1)
    only_bias = decay_groups(model, 0.1, no_decay=("bias",))
    assert set(names_of(model, only_bias[1]["params"])) == {"transformer.h.0.ln_1.bias", "transformer.h.0.attn.bias", "transformer.ln_f.bias"}
    with_pattern = decay_groups(model, 0.1, no_decay=(), no_decay_patterns=(r"\.mlp\.",))
    assert names_of(model, with_pattern[1]["params"]) == ["transformer.h.0.mlp.weight"]
    nothing_exempt = decay_groups(model, 0.1, no_decay=())
    assert len(nothing_exempt) == 1 and len(nothing_exempt[0]["params"]) == len([p for p in model.parameters() if p.requires_grad])
    assert names_of(model, decay_groups(model, 0.1, no_decay="bias")[1]["params"]) == names_of(model, only_bias[1]["params"])


def test_decay_groups_exempt_bias_in_the_name_and_embedding_bags():
    """``*bias*`` in a parameter's own name (nn.MultiheadAttention's ``in_proj_bias``) is a bias;
    an nn.EmbeddingBag's weight is an embedding's."""
    model = torch.nn.ModuleDict(dict(attn=torch.nn.MultiheadAttention(8, 2), bag=torch.nn.EmbeddingBag(10, 8)))
    decay, keep = decay_groups(model, 0.1)
    assert set(names_of(model, keep["params"])) == {"attn.in_proj_bias", "attn.out_proj.bias", "bag.weight"}
    assert set(names_of(model, decay["params"])) == {"attn.in_proj_weight", "attn.out_proj.weight"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(weight_decay=-0.1), "weight_decay: -0.1"),
    (dict(weight_decay=float("nan")), "weight_decay: nan"),
    (dict(weight_decay=0.1, no_decay=("bias", "layernorm")), "no_decay: \\['layernorm'\\]"),
    (dict(weight_decay=0.1, params=[]), "option: params"),
    (dict(weight_decay=True), "weight_decay must be a number, got True"),
    (dict(weight_decay="0.1"), "weight_decay must be a number"),
])
def test_decay_groups_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        decay_groups(TinyGPT(), **kwargs)


def test_decay_groups_take_the_weight_decays_the_optimizer_takes():
    """A numpy scalar (a config file's value) or a 1-element Tensor, as MaskedAdamW's own option."""
    model = TinyGPT()
    for weight_decay in (np.float32(0.25), torch.tensor(0.25)):
        groups = decay_groups(model, weight_decay=weight_decay)
        assert float(groups[0]["weight_decay"]) == 0.25
        MaskedAdamW(groups, lr=0.1)


@pytest.mark.parametrize("optimizer_cls", [MaskedAdamW, torch.optim.AdamW])
def test_decay_groups_drive_weight_decay(optimizer_cls):
    """With zero grads only weight decay moves a param: the decay group shrinks, the rest stays."""
    model = TinyGPT(layers=1)
    opt = optimizer_cls(decay_groups(model, weight_decay=0.5), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decayed = set(names_of(model, opt.param_groups[0]["params"]))
    for name, p in model.named_parameters():
        expected = before[name] * (1 - 0.1 * 0.5) if name in decayed else before[name]
        assert torch.equal(p.detach(), expected), name


def depth_lrs(model: nn.Module, groups: list, lr: float) -> dict[str, float]:
    return {name: group["lr"] / lr for group in groups for name in names_of(model, group["params"])}


def test_layerwise_lr_gpt_names():
    model = TinyGPT(layers=3)
    lr, decay = 1e-3, 0.5
    groups = layerwise_lr_groups(model, lr, decay)
    # depth 0 embeddings, 1..3 blocks, 4 final norm/head; lr * decay ** (4 - depth)
    expected = {"transformer.wte.weight": decay**4, "transformer.wpe.weight": decay**4,
                "transformer.ln_f.weight": 1.0, "transformer.ln_f.bias": 1.0}
    for i in range(3):
        for name in BLOCK_DECAY + BLOCK_NO_DECAY:
            expected[f"transformer.h.{i}.{name}"] = decay ** (3 - i)
    assert depth_lrs(model, groups, lr) == pytest.approx(expected, rel=1e-12)
    assert [g["lr"] for g in groups] == sorted(g["lr"] for g in groups)  # ordered input -> output
    assert all("weight_decay" not in g for g in groups)


def test_layerwise_lr_with_weight_decay_split():
    model = TinyGPT(layers=2)
    groups = layerwise_lr_groups(model, 1.0, 0.8, weight_decay=0.1, density=0.2)
    assert [(round(g["lr"], 12), g["weight_decay"], len(g["params"])) for g in groups] == [
        (round(0.8**3, 12), 0.0, 2),  # embeddings: no decay
        (round(0.8**2, 12), 0.1, 2), (round(0.8**2, 12), 0.0, 4),
        (0.8, 0.1, 2), (0.8, 0.0, 4),
        (1.0, 0.0, 2),  # ln_f; lm_head is tied to wte
    ]
    assert all(g["density"] == 0.2 for g in groups)
    MaskedAdamW(groups)  # standard param groups: accepted as they are


def _nest(**children: nn.Module) -> nn.Module:
    module = nn.Module()
    for name, child in children.items():
        setattr(module, name, child)
    return module


def test_layerwise_lr_llama_and_bert_names():
    llama = _nest(model=_nest(embed_tokens=nn.Embedding(10, 4), layers=nn.ModuleList(nn.Linear(4, 4) for _ in range(2)),
                              norm=nn.RMSNorm(4)), lm_head=nn.Linear(4, 10, bias=False))
    assert depth_lrs(llama, layerwise_lr_groups(llama, 1.0, 0.5), 1.0) == {
        "model.embed_tokens.weight": 0.125, "model.layers.0.weight": 0.25, "model.layers.0.bias": 0.25,
        "model.layers.1.weight": 0.5, "model.layers.1.bias": 0.5, "model.norm.weight": 1.0, "lm_head.weight": 1.0,
    }
    bert = _nest(bert=_nest(embeddings=_nest(word_embeddings=nn.Embedding(10, 4), LayerNorm=nn.LayerNorm(4)),
                            encoder=_nest(layer=nn.ModuleList(nn.Linear(4, 4, bias=False) for _ in range(12)))),
                 classifier=nn.Linear(4, 2, bias=False))
    lrs = depth_lrs(bert, layerwise_lr_groups(bert, 1.0, 0.5), 1.0)
    assert lrs["bert.embeddings.LayerNorm.weight"] == lrs["bert.embeddings.word_embeddings.weight"] == 0.5**13
    assert lrs["bert.encoder.layer.10.weight"] == 0.5**2 and lrs["bert.encoder.layer.11.weight"] == 0.5
    assert lrs["classifier.weight"] == 1.0


def test_layerwise_lr_embed_in_names():
    """``pos_embed``-style parameters count as embeddings; an ``unembed`` head does not."""
    model = _nest(blocks=nn.ModuleList(nn.Linear(2, 2, bias=False) for _ in range(2)), unembed=nn.Linear(2, 3, bias=False))
    model.pos_embed = nn.Parameter(torch.zeros(2))
    assert depth_lrs(model, layerwise_lr_groups(model, 1.0, 0.5), 1.0) == {
        "pos_embed": 0.125, "blocks.0.weight": 0.25, "blocks.1.weight": 0.5, "unembed.weight": 1.0,
    }


def test_layerwise_lr_survives_lr_scheduler():
    model = TinyGPT(layers=2)
    opt = MaskedAdamW(layerwise_lr_groups(model, 1e-2, 0.5))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.1)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * 0.5**k for k in (3, 2, 1, 0)], rel=1e-12)
    assert scheduler.get_last_lr() == [g["lr"] for g in opt.param_groups]


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0, decay=0.5), "lr: -1.0"),
    (dict(lr=1.0, decay=0.0), "decay: 0.0"),
    (dict(lr=1.0, decay=1.5), "decay: 1.5"),
    (dict(lr=1.0, decay=0.5, weight_decay=-1.0), "weight_decay: -1.0"),
    (dict(lr=1.0, decay=0.5, num_layers=2), "num_layers: 2 .*block 2"),
    (dict(lr=1.0, decay=0.5, layer_pattern=r"\.stage\.(\d+)\."), "layer_pattern"),
    (dict(lr=1.0, decay=0.5, params=[]), "option: params"),
    (dict(lr=float("inf"), decay=0.5), "lr: inf"),
    (dict(lr=1.0, decay=0.5, num_layers=True), "num_layers: True"),
    (dict(lr=1.0, decay=0.5, num_layers=3.0), "num_layers: 3.0"),
])
def test_layerwise_lr_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        layerwise_lr_groups(TinyGPT(layers=3), **kwargs)


def test_the_builders_name_what_they_take():
    """Given model.parameters() instead of the model, they say so; a pattern that matches no
    name shows the model's names and how to write one."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    for build in (lambda m: decay_groups(m, 0.1), lambda m: layerwise_lr_groups(m, 1e-3, 0.9)):
        with pytest.raises(TypeError, match=r"takes the model \(an nn.Module.*got generator \(pass the model, not model.parameters\(\)\)"):
            build(model.parameters())
    with pytest.raises(ValueError, match=r"matches no parameter name of the model: '0.weight', '0.bias', '2.weight', "
                                         r"'2.bias', ... \(6 in all\); its first group must capture the block index"):
        layerwise_lr_groups(model, 1e-3, 0.9)
    groups = layerwise_lr_groups(model, 1e-3, 0.5, layer_pattern=r"^(\d+)\.")  # the pattern the message suggests
    assert [g["lr"] for g in groups] == [1e-3 * 0.5 ** 4, 1e-3 * 0.5 ** 2, 1e-3 * 0.5]  # blocks 0, 2, 3 of 4


def test_tiny_hf_gpt2():
    """On a real (random, tiny) GPT-2: HF's decay set minus the embeddings (and the head tied to
    wte, which HF lists by name); blocks found by name."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=8, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    groups = decay_groups(model, 0.1)
    hf_decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    assert set(names_of(model, groups[0]["params"])) == hf_decay - {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"}
    assert set(names_of(model, groups[0]["params"])) == {
        f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    lrs = depth_lrs(model, layerwise_lr_groups(model, 1.0, 0.5), 1.0)
    assert lrs["transformer.wte.weight"] == 0.125 and lrs["transformer.h.0.attn.c_attn.weight"] == 0.25
    assert lrs["transformer.h.1.ln_2.bias"] == 0.5 and lrs["transformer.ln_f.weight"] == 1.0


def test_named_parameters_as_torch_optimizers_take_them():
    """(name, tensor) pairs, in one list or per group: the same steps as plain tensors, and the
    names saved in the state dict (torch >= 2.6 records them as ``param_names``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    twin = [p.detach().clone().requires_grad_() for p in model.parameters()]
    named = list(model.named_parameters())
    for params in (named, [{"params": named[:2], "density": 0.5}, {"params": named[2:]}]):
        plain = twin if isinstance(params[0], tuple) else [{**g, "params": twin[:2] if i == 0 else twin[2:]} for i, g in enumerate(params)]
        ours, reference = MaskedAdamW(params, lr=1e-2), MaskedAdamW(plain, lr=1e-2)
        for _ in range(3):
            for p, q in zip(model.parameters(), twin):
                p.grad = torch.randn(p.shape)
                q.grad = p.grad.clone()
            ours.step()
            reference.step()
        for p, q in zip(model.parameters(), twin):
            assert torch.equal(p.detach(), q.detach())
        names = [name for group in ours.state_dict()["param_groups"] for name in group["param_names"]]
        assert names == [name for name, _ in named]


def test_a_set_of_params_in_a_group_is_refused_like_torch():
    with pytest.raises(TypeError, match="ordered collections"):
        MaskedAdamW([{"params": {torch.zeros(3, requires_grad=True)}}])
    opt = MaskedAdamW([torch.zeros(3, requires_grad=True)])
    with pytest.raises(TypeError, match="ordered collections"):
        opt.add_param_group({"params": {torch.zeros(2, requires_grad=True)}})


def test_numpy_scalars_are_numbers():
    np = pytest.importorskip("numpy")
    params = [torch.randn(8, requires_grad=True)]
    twin = [params[0].detach().clone().requires_grad_()]
    ours = MaskedAdamW(params, lr=np.float64(1e-2), weight_decay=np.int64(0), betas=(np.float32(0.9), 0.999), gate_block=np.int64(1))
    reference = MaskedAdamW(twin, lr=1e-2, weight_decay=0, betas=(float(np.float32(0.9)), 0.999))
    for step in range(3):
        ours.param_groups[0]["lr"] = np.float64(1e-2 / (step + 1))  # as a scheduler computing with numpy writes it
        reference.param_groups[0]["lr"] = 1e-2 / (step + 1)
        params[0].grad = torch.randn(8)
        twin[0].grad = params[0].grad.clone()
        ours.step()
        reference.step()
    assert torch.equal(params[0].detach(), twin[0].detach())
    with pytest.raises(ValueError, match="lr must be a number, got 'x'"):
        MaskedAdamW(params, lr="x")


def test_layerwise_lr_block_names_are_whole_path_components():
    """``h.2`` inside ``branch.2`` is no block index: only a whole name component counts."""
    model = _nest(blocks=nn.ModuleList(nn.Linear(2, 2, bias=False) for _ in range(2)),
                  branch=nn.ModuleList(nn.Linear(2, 2, bias=False) for _ in range(3)))
    assert depth_lrs(model, layerwise_lr_groups(model, 1.0, 0.5), 1.0) == {
        "blocks.0.weight": 0.25, "blocks.1.weight": 0.5,
        "branch.0.weight": 1.0, "branch.1.weight": 1.0, "branch.2.weight": 1.0,
    }
