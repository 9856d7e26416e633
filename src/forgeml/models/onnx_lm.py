"""A causal LM as one ONNX graph with its key/value cache as inputs and outputs, run by ONNX Runtime behind
the interface of a Hugging Face model, so `forgeml generate`, perplexity and the serving engine use it
unchanged.

The graph takes `input_ids`, `attention_mask`, `position_ids` and the cache of every layer (`past_<2i>`
keys, `past_<2i+1>` values, [batch, heads, past length, head size]; past length 0 for a prompt) and
returns the logits of every position plus the cache extended by the new tokens. On a small model a
decoding step in PyTorch eager is mostly per-operator overhead, which ONNX Runtime does not have; int8
weights (dynamic quantization of the MatMuls) then cut the weight reads of larger ones.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from forgeml.generate import forward_arguments, returned_cache

OPSET = 17


class _Step(nn.Module):
    """The traced function: one forward pass from explicit cache tensors to logits and the new cache."""

    def __init__(self, lm: PreTrainedModel, layers: int):
        super().__init__()
        self.lm, self.layers = lm, layers
        self.cache_argument = forward_arguments(lm)[0]

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache(config=self.lm.config)
        for index in range(self.layers):
            cache.update(past[2 * index], past[2 * index + 1], index)
        outputs = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_argument: cache},
        )
        present = [t for layer in returned_cache(outputs).layers for t in (layer.keys, layer.values)]
        return (outputs.logits, *present)


def export_causal_lm(lm: PreTrainedModel, path: Path) -> None:
    """Write `lm` as an ONNX graph with explicit cache inputs and outputs (legacy exporter, opset 17)."""
    lm = lm.eval()
    layers, heads, head_size = _cache_shape(lm)
    past_length = 3
    past = [torch.randn(1, heads, past_length, head_size) for _ in range(2 * layers)]
    ids = torch.zeros(1, 2, dtype=torch.long)
    mask = torch.ones(1, past_length + 2, dtype=torch.long)
    positions = torch.tensor([[past_length, past_length + 1]])
    past_names = [f"past_{i}" for i in range(2 * layers)]
    present_names = [f"present_{i}" for i in range(2 * layers)]
    dynamic: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "new"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "new"},
        "logits": {0: "batch", 1: "new"},
    }
    dynamic |= {name: {0: "batch", 2: "past"} for name in past_names}
    dynamic |= {name: {0: "batch", 2: "total"} for name in present_names}
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(
            _Step(lm, layers),
            (ids, mask, positions, *past),
            str(path),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )


def quantize_causal_lm(source: Path, target: Path) -> None:
    """int8 weights for the graph's MatMuls (ONNX Runtime dynamic quantization; activations quantized per call)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)


class OnnxCausalLM:
    """An exported causal LM that answers like `AutoModelForCausalLM` (logits and a `DynamicCache`)."""

    def __init__(self, path: Path, reference: PreTrainedModel, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.config, self.generation_config = reference.config, getattr(reference, "generation_config", None)
        self.layers, self.heads, self.head_size = _cache_shape(reference)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.training = False

    def eval(self) -> OnnxCausalLM:
        return self

    def train(self, mode: bool = True) -> OnnxCausalLM:
        return self

    def __call__(self, **arguments: Any) -> CausalLMOutputWithPast:
        return self.forward(**arguments)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = True,
        logits_to_keep: int = 0,
    ) -> CausalLMOutputWithPast:
        batch, new = input_ids.shape
        layers = getattr(past_key_values, "layers", None) or []
        past_length = layers[0].keys.shape[-2] if layers and layers[0].keys is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_length + new, dtype=torch.long)
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + new).expand(batch, new)
        feed = {
            "input_ids": _numpy(input_ids, np.int64),
            "attention_mask": _numpy(attention_mask, np.int64),
            "position_ids": _numpy(position_ids, np.int64),
        }
        empty = np.zeros((batch, self.heads, 0, self.head_size), dtype=np.float32)
        for index in range(self.layers):
            keys, values = (layers[index].keys, layers[index].values) if past_length else (None, None)
            feed[f"past_{2 * index}"] = empty if keys is None else _numpy(keys, np.float32)
            feed[f"past_{2 * index + 1}"] = empty if values is None else _numpy(values, np.float32)
        logits, *present = self.session.run(None, feed)
        logits = torch.from_numpy(logits)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        cache = None
        if use_cache:
            cache = DynamicCache(config=self.config)
            for index in range(self.layers):
                cache.update(torch.from_numpy(present[2 * index]), torch.from_numpy(present[2 * index + 1]), index)
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)


def _cache_shape(lm: PreTrainedModel) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of the model's cache."""
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    layers = config.num_hidden_layers
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return layers, heads, head_size


def _numpy(tensor: torch.Tensor, dtype: type) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(dtype, copy=False)
