"""A multi-layer perceptron over standardised numeric and encoded categorical columns."""

from __future__ import annotations

import torch
from torch import nn


class TabularMLP(nn.Module):
    """Numeric features + one-hot or embedded categoricals -> hidden layers -> `num_outputs`.

    With `hidden_sizes=[]` it is a linear model (linear/logistic regression).
    """

    def __init__(
        self,
        num_numeric: int,
        cardinalities: list[int],
        num_outputs: int,
        hidden_sizes: list[int] = (128, 64),
        dropout: float = 0.1,
        categorical: str = "onehot",
        embedding_dim: int = 8,
    ):
        super().__init__()
        self.cardinalities = list(cardinalities)
        self.categorical = categorical
        if categorical == "embedding":
            self.embeddings = nn.ModuleList(nn.Embedding(size, embedding_dim) for size in self.cardinalities)
            width = num_numeric + embedding_dim * len(self.cardinalities)
        else:
            self.embeddings = nn.ModuleList()
            width = num_numeric + sum(self.cardinalities)
        layers: list[nn.Module] = []
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, num_outputs))
        self.layers = nn.Sequential(*layers)

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        parts = [numeric]
        for column, size in enumerate(self.cardinalities):
            ids = categorical[:, column]
            if self.categorical == "embedding":
                parts.append(self.embeddings[column](ids))
            else:
                parts.append(nn.functional.one_hot(ids, size).to(numeric.dtype))
        return self.layers(torch.cat(parts, dim=1))

    def training_flops(self, lengths: torch.Tensor | list[int], padded_length: int) -> float:
        weights = sum(m.weight.numel() for m in self.layers if isinstance(m, nn.Linear))
        return 3.0 * 2.0 * weights * len(lengths)
