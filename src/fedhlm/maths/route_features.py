"""What a richer routing head sees beyond the four scores of `maths.uncertainty`: pure tensor maths.

Every column costs the client nothing it does not already compute: the label columns read the
class verbalisers' slice of the same next-token distribution, the hidden columns the SLM's own
representation of the routed position (the input of its LM head), compressed by a whitened PCA
fitted once on the calibration split. A feature set is a small class in `FEATURE_SETS`; the
entropy stays column 0 in every set, so the scalar head (and U-HLM's static threshold) read the
same number whatever set a run chooses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedhlm.maths.uncertainty import FEATURE_NAMES

LABEL_FEATURE_NAMES: tuple[str, ...] = ("label_entropy", "label_max_prob", "label_margin", "label_mass")


def label_features(logits: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
    """[B, V] logits -> [B, 4]: over the task's C class tokens, the entropy (in units of log C), max
    probability and top-2 margin of the distribution renormalised over them, and the mass the full
    distribution puts on them at all (low: the SLM would rather say something that is no class)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    label_logp = logp.index_select(-1, label_ids)
    mass = label_logp.exp().sum(dim=-1)
    p = torch.softmax(label_logp, dim=-1)
    c = p.shape[-1]
    ent = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1) / (math.log(c) if c > 1 else 1.0)
    top = p.topk(min(2, c), dim=-1).values
    margin = top[..., 0] - top[..., 1] if c > 1 else torch.ones_like(mass)
    return torch.stack([ent, top[..., 0], margin, mass], dim=-1)


@dataclass(frozen=True)
class WhitenedPCA:
    """x -> ((x - mean) @ basis) / scale: the top `dim` principal directions, each of unit variance."""

    mean: torch.Tensor  # [H]
    basis: torch.Tensor  # [H, dim]
    scale: torch.Tensor  # [dim]

    @classmethod
    def fit(cls, x: torch.Tensor, dim: int) -> WhitenedPCA:
        """Fitted on rows x [N, H]; needs N > dim so that every kept direction has variance."""
        if x.ndim != 2 or not 0 < dim <= x.shape[1]:
            raise ValueError(f"need [N, H] rows and 0 < dim <= H, got {tuple(x.shape)} and dim {dim}")
        if x.shape[0] <= dim:
            raise ValueError(f"a {dim}-dim PCA needs more than {dim} rows, got {x.shape[0]}")
        x = x.double()
        mean = x.mean(dim=0)
        _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        scale = (s[:dim] / math.sqrt(x.shape[0] - 1)).clamp_min(1e-8)
        return cls(mean.float(), vh[:dim].T.contiguous().float(), scale.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) @ self.basis) / self.scale


class FeatureSet:
    """Base: the four scores of `maths.uncertainty` (entropy, max prob, top-2 margin, sampling)."""

    name: ClassVar[str] = "basic"
    label: ClassVar[bool] = False  # adds LABEL_FEATURE_NAMES
    hidden: ClassVar[bool] = False  # adds hidden_dim whitened PCA components of the SLM's hidden state

    def __init__(self, hidden_dim: int = 0) -> None:
        self.hidden_dim = hidden_dim if self.hidden else 0

    def names(self) -> tuple[str, ...]:
        label = LABEL_FEATURE_NAMES if self.label else ()
        return FEATURE_NAMES + label + tuple(f"hidden_{i}" for i in range(self.hidden_dim))

    @property
    def num_features(self) -> int:
        return len(self.names())

    def assemble(self, base: torch.Tensor, logits: torch.Tensor, label_ids: torch.Tensor,
                 hidden: torch.Tensor | None = None, pca: WhitenedPCA | None = None) -> torch.Tensor:
        """[B, F]: the base scores [B, 4] followed by this set's extra columns."""
        cols = [base.float()]
        if self.label:
            cols.append(label_features(logits, label_ids))
        if self.hidden:
            if hidden is None or pca is None:
                raise ValueError(f"feature set {self.name!r} needs the hidden state and a fitted PCA")
            cols.append(pca(hidden))
        return torch.cat(cols, dim=-1)


class LabelFeatureSet(FeatureSet):
    """The basic scores and the same scores over the task's class tokens."""

    name = "label"
    label = True


class HiddenFeatureSet(FeatureSet):
    """The label set and the SLM's own token representation, compressed (a probe on the SLM's state)."""

    name = "hidden"
    label = True
    hidden = True


FEATURE_SETS: dict[str, type[FeatureSet]] = {c.name: c for c in (FeatureSet, LabelFeatureSet, HiddenFeatureSet)}


def feature_set(name: str, hidden_dim: int = 16) -> FeatureSet:
    """The feature set registered as `name`."""
    if name not in FEATURE_SETS:
        raise ValueError(f"feature set must be one of {tuple(FEATURE_SETS)}, got {name!r}")
    return FEATURE_SETS[name](hidden_dim)
