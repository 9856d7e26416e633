"""Pruning: remove the weights (or whole feed-forward neurons) that matter least, then let the pruned
model recover by learning from the original one (`distill.teach`).

- Unstructured: global magnitude pruning (torch.nn.utils.prune, L1) over every Linear weight but the
  head's, made permanent. The zeros compress well but dense kernels do not run faster.
- Structured: in every transformer layer, the feed-forward neurons with the smallest
  |input weights| x |output weights| are cut out, the same share in each layer, so the matrices
  really shrink and the config's `intermediate_size` describes the result (it reloads like any model).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import prune

from forgeml.errors import ConfigError


def magnitude_prune(model: nn.Module, sparsity: float) -> nn.Module:
    """A copy of `model` with the `sparsity` share of its Linear weights (head excepted) masked to zero.

    The masks stay on (weight = weight_orig * mask) so a recovery fine-tune cannot bring pruned
    weights back; `make_permanent` bakes them in afterwards.
    """
    pruned = copy.deepcopy(model)
    head = getattr(pruned, "head", None)
    targets = [(m, "weight") for m in pruned.modules() if isinstance(m, nn.Linear) and m is not head]
    if not targets:
        raise ConfigError("compress.prune.sparsity: the model has no Linear layers to prune")
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    return pruned


def make_permanent(model: nn.Module) -> float:
    """Fold every pruning mask into its weight (a plain module again); return the share of pruned weights now zero."""
    zeros = total = 0
    for module in model.modules():
        if prune.is_pruned(module) and hasattr(module, "weight_mask"):
            prune.remove(module, "weight")
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / max(total, 1)


def _feed_forward_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    layers = getattr(getattr(getattr(model, "encoder", None), "encoder", None), "layer", None)
    if layers is None or not all(hasattr(one, "intermediate") and hasattr(one, "output") for one in layers):
        raise ConfigError("compress.prune.ffn_keep: needs a BERT-like text model (encoder.layer[i].intermediate)")
    return [(layer.intermediate, layer.output) for layer in layers]


def prune_feed_forward(model: nn.Module, keep: float) -> tuple[nn.Module, int]:
    """A copy of `model` keeping the `keep` share of each layer's feed-forward neurons; returns the new width."""
    pruned = copy.deepcopy(model)
    pairs = _feed_forward_pairs(pruned)
    width = pairs[0][0].dense.out_features
    kept_width = max(1, round(width * keep))
    with torch.no_grad():
        for intermediate, output in pairs:
            grow, shrink = intermediate.dense, output.dense  # d -> width, width -> d
            importance = grow.weight.norm(dim=1) * shrink.weight.norm(dim=0)
            kept = importance.topk(kept_width).indices.sort().values
            intermediate.dense = _linear(grow.weight[kept], grow.bias[kept] if grow.bias is not None else None)
            output.dense = _linear(shrink.weight[:, kept], shrink.bias)
    pruned.encoder.config.intermediate_size = kept_width
    return pruned, kept_width


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer
