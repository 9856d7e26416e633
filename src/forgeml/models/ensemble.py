"""Several trained models as one: their answers averaged, voted on, or stacked.

`EnsembleModel` takes every member's inputs in one call, under prefixed names (`g0.input_ids`,
`g1.numeric`, ...: members that encode their inputs alike share one group), runs each member once on
the whole batch and fuses what they say. For classes it returns log-probabilities, so a softmax of its
output is the ensemble's probability and everything downstream (metrics, calibration, serving) treats it
as any classifier's logits; for a number it returns the number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional

METHODS = ("mean", "vote", "stack")
VOTE_TIE_BREAK = 1e-3  # a vote share moved by at most this much of the mean probability: it breaks ties only


class EnsembleModel(nn.Module):
    """`members` (each a trained model), the input `groups` they read (group index per member), and how to
    fuse them: `mean` (of probabilities, or of values), `vote` (share of members choosing each class, ties
    broken by the mean probability) or `stack` (`stacker`: a linear model on the members' log-probabilities
    or values, fitted on held-out outputs)."""

    def __init__(
        self,
        members: Sequence[nn.Module],
        groups: Sequence[int],
        method: str,
        classification: bool,
        stacker: nn.Linear | None = None,
    ):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method: {method!r}; choose from {', '.join(METHODS)}")
        self.members = nn.ModuleList(members)
        self.groups = list(groups)
        self.method = method
        self.classification = classification
        self.stacker = stacker

    def member_outputs(self, **inputs: torch.Tensor) -> torch.Tensor:
        """members x batch x outputs: each member's log-probabilities (classes) or values, on its own inputs."""
        outputs = []
        for member, group in zip(self.members, self.groups, strict=True):
            prefix = f"g{group}."
            own = {name[len(prefix) :]: tensor for name, tensor in inputs.items() if name.startswith(prefix)}
            output = member(**own).float()
            outputs.append(functional.log_softmax(output, dim=-1) if self.classification else output)
        return torch.stack(outputs)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.member_outputs(**inputs))

    def fuse(self, outputs: torch.Tensor) -> torch.Tensor:
        """The ensemble's output from the members' (members x batch x outputs)."""
        if self.method == "stack":
            if self.stacker is None:
                raise RuntimeError("the stacker is fitted on the members' validation outputs first (fit_ensemble)")
            return self.stacker(outputs.permute(1, 0, 2).flatten(1))
        if not self.classification:
            return outputs.mean(dim=0)
        mean_log_probability = torch.logsumexp(outputs, dim=0) - math.log(len(outputs))
        if self.method == "mean":
            return mean_log_probability
        votes = functional.one_hot(outputs.argmax(dim=-1), outputs.shape[-1]).sum(dim=0).float()
        shares = (votes + VOTE_TIE_BREAK * mean_log_probability.exp()) / len(outputs)
        return torch.log(shares / shares.sum(dim=-1, keepdim=True))
