"""A pre-trained Hugging Face encoder with a linear layer on every token: one score per tag per sub-token."""

from __future__ import annotations

import torch
from torch.nn import functional

from forgeml.models.hf import TextModel


class TokenTagger(TextModel):
    """Encoder -> dropout -> linear layer on each token's vector (no pooling).

    Outputs are [rows, `output_length`, tags]: padded past the batch's longest row with zeros, so that batches
    of any width stack into one array for evaluation (`evaluate.outputs.model_outputs`); the task's targets are
    padded alike with the ignored label. Loading and the FLOPs estimate are TextModel's.
    """

    output_length: int = 128  # the task sets it to model.max_length

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        logits = self.head(self.dropout(hidden))
        return functional.pad(logits, (0, 0, 0, self.output_length - logits.shape[1]))
