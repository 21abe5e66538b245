"""The frozen teacher a student distils from, held outside the student's registered modules.

Why outside: the teacher is neither trained nor saved with the student (a checkpoint of a 4 M-parameter
SLM must not carry a 23 M-parameter LLM), and Lightning must not put it in train mode (dropout would
change the targets from epoch to epoch).
"""

from __future__ import annotations

import torch

from fedhlm.models.backbone import load_causal_lm


class FrozenTeacher:
    """A Hugging Face causal LM in eval mode without gradients, moved to the student's device on use."""

    def __init__(self, spec: str | None = None) -> None:
        if spec is not None and spec.startswith("config:"):  # resolving here would train it without the fit's data
            raise ValueError(f"model.teacher {spec!r}: a config teacher is resolved on the fit's data by "
                             "get_or_train or `fedhlm fit`; give the module a model folder or cache:<name>")
        self._model: torch.nn.Module | None = None
        if spec is not None:
            self.set(load_causal_lm(spec))

    def set(self, model: torch.nn.Module | None) -> None:
        """Attach (or, with None, drop) the teacher; it is put in eval mode and frozen."""
        self._model = None if model is None else model.eval().requires_grad_(False)

    def on(self, device: torch.device) -> torch.nn.Module | None:
        """The teacher on ``device`` (None when there is none)."""
        if self._model is not None and next(self._model.parameters()).device != device:
            self._model.to(device)
        return self._model
