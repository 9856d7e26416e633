"""LoRA adapters (Hu et al. 2021) on any Hugging Face model, through PEFT's own API.

PEFT is an optional extra (`pip install forgeml[lora]`), imported only when a config asks for
adapters. transformers 5.x also has built-in adapter methods (`model.add_adapter`), but they require a
PEFT release newer than any published yet, so forgeml calls `get_peft_model` / `merge_and_unload`
directly; both are PEFT's stable public API.

A run with adapters saves them on their own in `model/adapter/` (`PeftModel.from_pretrained(base,
folder)` loads them) and, by default, the merged model in `model/`: the low-rank updates added into
the frozen weights, which is an ordinary model that loads and runs without PEFT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from forgeml.errors import ConfigError

ADAPTER_FOLDER = "adapter"


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError(
            "model.lora: LoRA adapters need the optional package peft: pip install 'forgeml[lora]'"
        ) from None
    return peft


def add_lora(model: nn.Module, options: dict[str, Any], task_type: str | None = None) -> nn.Module:
    """`model` wrapped with fresh LoRA adapters (`options` is the config's model.lora); only they train.

    `task_type` "CAUSAL_LM" makes PEFT wrap a causal LM so that it keeps `generate` and friends; None
    wraps any module (an encoder backbone under forgeml's own head).
    """
    peft = _peft()
    from transformers.pytorch_utils import Conv1D

    config = peft.LoraConfig(
        # GPT-2's Conv1D layers store their weight transposed; PEFT needs to know (it would warn and guess).
        fan_in_fan_out=any(isinstance(module, Conv1D) for module in model.modules()),
        r=options["r"],
        lora_alpha=options["alpha"],
        lora_dropout=options["dropout"],
        target_modules=options.get("target_modules"),
        task_type=task_type,
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as error:  # no default target modules for this architecture, or a name that matches nothing
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
        )
        raise ConfigError(
            f"model.lora.target_modules: {error}; this model's Linear layers are named {', '.join(linear)}"
        ) from None


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def save_adapter(model: nn.Module, folder: Path) -> None:
    """The adapter weights and config alone (safetensors + JSON), loadable with `PeftModel.from_pretrained`."""
    model.save_pretrained(folder / ADAPTER_FOLDER)


def merged(model: nn.Module) -> nn.Module:
    """The base model with the adapters added into its weights (PEFT's `merge_and_unload`)."""
    return model.merge_and_unload()


def load_adapter(base: nn.Module, folder: Path) -> nn.Module:
    """`base` with the adapter saved in `folder` (the run's model/adapter) applied, unmerged."""
    return _peft().PeftModel.from_pretrained(base, str(folder))


def trainable_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
