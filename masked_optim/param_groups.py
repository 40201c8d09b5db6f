"""Param-group builders: a weight-decay/no-decay split and layer-wise learning-rate decay.

Both return plain ``param_groups`` lists (dicts with ``"params"`` and hyper-parameters) that
any ``torch.optim`` optimizer accepts, MaskedAdamW included. Only parameters with
``requires_grad`` are grouped (as Hugging Face's Trainer does); a parameter shared by several
modules (tied embeddings) appears once.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn

from masked_optim.options import _number

NO_DECAY_KINDS = ("bias", "norm", "embedding")
"""What :func:`decay_groups` exempts from weight decay by default: biases (``*bias*`` in the
parameter's own name), parameters of normalisation layers (torch's norm classes and any class
named ``...Norm`` such as ``LlamaRMSNorm``) and parameters of ``nn.Embedding`` modules."""

LAYER_PATTERN = r"(?:^|\.)(?:h|layers|layer|blocks|block)\.(\d+)(?:\.|$)"
"""Finds the block index in Hugging Face-style names: ``transformer.h.3.``, ``model.layers.3.``,
``encoder.layer.3.``, ``blocks.3.`` (the first match in a name counts)."""

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
_NORM_NAME = re.compile(r"Norm(?:\d+d)?$")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or bool(_NORM_NAME.search(type(module).__name__))


def _kinds(model: nn.Module) -> dict[int, set[str]]:
    """For every parameter (by id), the kinds it belongs to, from every module that owns it."""
    kinds: dict[int, set[str]] = {}
    for module in model.modules():
        for leaf, param in module._parameters.items():
            if param is None:
                continue
            found = kinds.setdefault(id(param), set())
            if "bias" in leaf:
                found.add("bias")
            if _is_norm(module):
                found.add("norm")
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                found.add("embedding")
    return kinds


def _check_model(function: str, model: Any) -> None:
    """The builders take the module (they read its names and layer types), not its parameters."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{function} takes the model (an nn.Module: it reads parameter names and layer types), "
                        f"got {type(model).__name__}" + (" (pass the model, not model.parameters())"
                                                         if isinstance(model, Iterable) else ""))


def _check_no_decay(no_decay: Iterable[str]) -> frozenset[str]:
    chosen = frozenset(no_decay) if not isinstance(no_decay, str) else frozenset((no_decay,))
    unknown = sorted(chosen - set(NO_DECAY_KINDS))
    if unknown:
        raise ValueError(f"Invalid no_decay: {unknown!r} (expected kinds from {NO_DECAY_KINDS!r})")
    return chosen


def _check_weight_decay(weight_decay: Any) -> None:
    """The optimizer's own check (``options.validate_group``): what one takes, the other does."""
    value = _number("weight_decay", weight_decay)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid weight_decay: {weight_decay!r} (must be finite and >= 0)")


def _check_options(options: dict[str, Any], reserved: tuple[str, ...]) -> None:
    for key in reserved:
        if key in options:
            raise ValueError(f"Invalid option: {key}={options[key]!r} (set by this function)")


def no_decay_names(
    model: nn.Module, no_decay: Iterable[str] = NO_DECAY_KINDS, no_decay_patterns: Iterable[str] = ()
) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the parameters exempt from weight decay.

    Args:
        model: the model.
        no_decay: kinds to exempt, from :data:`NO_DECAY_KINDS`.
        no_decay_patterns: extra regular expressions; a parameter whose full name matches one
            (``re.search``) is exempt too (e.g. ``"pos_embed"``, ``"cls_token"``).
    """
    chosen = _check_no_decay(no_decay)
    patterns = [re.compile(p) for p in no_decay_patterns]
    kinds = _kinds(model)
    return {
        name for name, param in model.named_parameters()
        if kinds.get(id(param), set()) & chosen or any(p.search(name) for p in patterns)
    }


def decay_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay: Iterable[str] = NO_DECAY_KINDS,
    *,
    no_decay_patterns: Iterable[str] = (),
    **options: Any,
) -> list[dict[str, Any]]:
    """Split the trainable parameters into a weight-decay group and a no-decay group.

    Args:
        model: the model whose ``named_parameters()`` are grouped.
        weight_decay: weight decay of the first group (the second gets 0.0).
        no_decay: kinds exempt from weight decay, from :data:`NO_DECAY_KINDS`
            (``"bias"``, ``"norm"``, ``"embedding"``).
        no_decay_patterns: regular expressions on full parameter names, exempt as well.
        **options: further hyper-parameters set in both groups (e.g. ``density=0.1``).

    Returns:
        ``[{"params": [...], "weight_decay": weight_decay, **options},
        {"params": [...], "weight_decay": 0.0, **options}]``, parameters in
        ``named_parameters()`` order; an empty group is left out.

    Example::

        opt = MaskedAdamW(decay_groups(model, weight_decay=0.1), lr=3e-4)
    """
    _check_model("decay_groups", model)
    _check_weight_decay(weight_decay)
    _check_options(options, ("params",))
    exempt = no_decay_names(model, no_decay, no_decay_patterns)
    decay, keep = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (keep if name in exempt else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay), **options},
        {"params": keep, "weight_decay": 0.0, **options},
    ]
    return [group for group in groups if group["params"]]


_EMBED = re.compile(r"(?<!un)embed", re.IGNORECASE)


def _depth(name: str, kinds: set[str], num_layers: int, pattern: re.Pattern) -> int:
    """Depth of a parameter for layer-wise lr decay: 0 embeddings, 1..num_layers the blocks,
    num_layers + 1 everything after them (final norm, head)."""
    match = pattern.search(name)
    if match:
        block = int(match.group(1))
        if block >= num_layers:
            raise ValueError(f"Invalid num_layers: {num_layers} (parameter {name!r} is in block {block})")
        return block + 1
    if "embedding" in kinds or any(_EMBED.search(part) for part in name.split(".")):
        return 0
    return num_layers + 1


def layerwise_lr_groups(
    model: nn.Module,
    lr: float,
    decay: float,
    *,
    weight_decay: Optional[float] = None,
    no_decay: Iterable[str] = NO_DECAY_KINDS,
    no_decay_patterns: Iterable[str] = (),
    num_layers: Optional[int] = None,
    layer_pattern: str = LAYER_PATTERN,
    **options: Any,
) -> list[dict[str, Any]]:
    """Param groups with layer-wise learning-rate decay: the lr shrinks toward the input.

    A parameter at depth ``d`` gets ``lr * decay ** (num_layers + 1 - d)``, where the depth is
    0 for embeddings (parameters of ``nn.Embedding`` modules, or with ``embed`` in a part of
    their name, e.g. BERT's ``embeddings.LayerNorm`` or ViT's ``pos_embed``), ``i + 1`` for block ``i`` (found by
    ``layer_pattern`` in the name, e.g. ``transformer.h.3.``) and ``num_layers + 1`` for
    everything else (final norm, head), which keeps ``lr``.

    Args:
        model: the model whose ``named_parameters()`` are grouped.
        lr: learning rate of the last depth (the head).
        decay: factor per depth, in (0, 1].
        weight_decay: None: one group per depth without a ``weight_decay`` key (the optimizer's
            default applies); a number: per depth a group with this weight decay and one with
            0.0 for the kinds in ``no_decay`` and names matching ``no_decay_patterns``.
        no_decay, no_decay_patterns: as in :func:`decay_groups` (used only with weight_decay).
        num_layers: number of blocks; by default the largest block index found plus one.
        layer_pattern: regular expression whose first group is the block index.
        **options: further hyper-parameters set in every group.

    Returns:
        Groups ordered by depth (decay group before no-decay group); empty groups left out.

    Raises:
        ValueError: on lr < 0, decay outside (0, 1], weight_decay < 0, or when no parameter
            name matches ``layer_pattern``.
    """
    _check_model("layerwise_lr_groups", model)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"Invalid lr: {lr!r} (must be a finite number >= 0)")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay <= 1.0:
        raise ValueError(f"Invalid decay: {decay!r} (must be in (0, 1])")
    if weight_decay is not None:
        _check_weight_decay(weight_decay)
    _check_options(options, ("params", "lr", "weight_decay"))
    pattern = re.compile(layer_pattern)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    blocks = [int(m.group(1)) for m in (pattern.search(n) for n, _ in named) if m]
    if not blocks:
        names = [n for n, _ in named]
        shown = ", ".join(map(repr, names[:4])) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        raise ValueError(
            f"Invalid layer_pattern: {layer_pattern!r} (matches no parameter name of the model: {shown}; its first "
            "group must capture the block index, e.g. layer_pattern=r\"^(\\d+)\\.\" for an nn.Sequential of blocks)"
        )
    if num_layers is None:
        num_layers = max(blocks) + 1
    elif isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"Invalid num_layers: {num_layers!r} (must be an int >= 1)")
    exempt = no_decay_names(model, no_decay, no_decay_patterns) if weight_decay is not None else set()
    kinds = _kinds(model)
    last = num_layers + 1
    buckets: dict[tuple[int, bool], list[torch.Tensor]] = {}
    for name, param in named:
        depth = _depth(name, kinds.get(id(param), set()), num_layers, pattern)
        buckets.setdefault((depth, name in exempt), []).append(param)
    groups = []
    for depth, exempted in sorted(buckets):
        group: dict[str, Any] = {"params": buckets[depth, exempted], "lr": lr * decay ** (last - depth)}
        if weight_decay is not None:
            group["weight_decay"] = 0.0 if exempted else float(weight_decay)
        groups.append({**group, **options})
    return groups
