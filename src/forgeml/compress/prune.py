"""Pruning: remove the weights (or whole feed-forward neurons) that matter least, then let the pruned
model recover by learning from the original one (`distill.teach`).

- Unstructured: global magnitude pruning (torch.nn.utils.prune, L1) over every Linear weight but the
  head's, made permanent. The zeros compress well but dense kernels do not run faster.
- Structured: in every transformer layer, the feed-forward neurons with the smallest
  |input weights| x |output weights| are cut out, the same share in each layer, so the matrices
  really shrink and the config's `intermediate_size` describes the result (it reloads like any model).
- Structured: in every transformer layer, the attention heads that contribute least to the layer's
  output on training data (the mean norm of each head's share of the attention output, after the
  output projection) are cut out, the same share in each layer.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import prune

from forgeml.errors import ConfigError
from forgeml.models.hf import attention_blocks, remove_attention_heads


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


def head_importance(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
    """(layers, heads): the mean norm, over real (not padding) tokens, of each head's contribution to its
    layer's attention output, i.e. its context vectors times its columns of the output projection."""
    blocks = attention_blocks(model.encoder)
    heads, size = blocks[0].self.num_attention_heads, blocks[0].self.attention_head_size
    totals = torch.zeros(len(blocks), heads)
    tokens = 0
    mask: torch.Tensor | None = None

    def measure(index: int):
        def hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...]) -> None:
            context = inputs[0].reshape(*inputs[0].shape[:-1], heads, size)  # (batch, tokens, heads, size)
            projection = module.weight.reshape(module.out_features, heads, size)  # (out, heads, size)
            share = torch.einsum("btks,oks->btko", context, projection).norm(dim=-1)  # (batch, tokens, heads)
            totals[index] += (share * mask.unsqueeze(-1)).sum(dim=(0, 1))

        return hook

    handles = [block.output.dense.register_forward_pre_hook(measure(i)) for i, block in enumerate(blocks)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch["attention_mask"].to(torch.float32)
                tokens += int(mask.sum())
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return totals / max(tokens, 1)


def prune_attention_heads(
    model: nn.Module, keep: float, batches: Iterable[dict[str, torch.Tensor]]
) -> tuple[nn.Module, dict[int, list[int]]]:
    """A copy of `model` keeping the `keep` share of each layer's attention heads (the most important on
    `batches`); returns it and the heads removed per layer."""
    importance = head_importance(model, batches)
    heads = importance.shape[1]
    kept = max(1, round(heads * keep))
    removed = {
        layer: sorted(importance[layer].argsort()[: heads - kept].tolist()) for layer in range(importance.shape[0])
    }
    pruned = copy.deepcopy(model)
    remove_attention_heads(pruned.encoder, removed)
    return pruned, removed


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer
