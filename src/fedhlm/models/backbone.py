"""Building and loading the two Hugging Face causal LMs, from local folders only.

By default the LLM is the pretrained all-MiniLM-L6-v2 encoder turned into a decoder
(``BertLMHeadModel`` with ``is_decoder=True``: causal self-attention, an LM head whose
output matrix is tied to the input embeddings; the head's transform and bias are new)
and the SLM is a much smaller BERT decoder on the same WordPiece vocabulary, optionally
started from MiniLM's embeddings projected onto their principal components. Nothing here
is specific to BERT beyond that default: any folder holding a Hugging Face causal LM
that shares the tokenizer loads through ``AutoModelForCausalLM``.

Paths: ``"minilm"`` names the bundled MiniLM folder, ``"cache:<name>"`` the newest
cached model of that name (see :mod:`fedhlm.models.cache`), anything else is a folder.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedhlm.models.store import MINILM, ModelFolderError, check_model_folder, resolve_model_path

log = logging.getLogger(__name__)

@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the load report (MiniLM has no LM head, so those weights are expected to be new)."""
    import transformers

    before = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(before)
        if bars:
            transformers.utils.logging.enable_progress_bar()


PROMPT_ATTENTION = ("causal", "bidirectional")
ATTENTION_KEY = "fedhlm_prompt_attention"  # written into a saved model's config.json


def prompt_attention(model: nn.Module) -> str:
    """How the model reads a prompt: "causal" (each token sees its left) or "bidirectional" (the whole prompt)."""
    return getattr(model.config, ATTENTION_KEY, "causal")


def set_prompt_attention(model: nn.Module, mode: str) -> nn.Module:
    """Make a BERT LM read the prompt causally or bidirectionally; the mode is saved with the model.

    Bidirectional is a prefix LM over the prompt: the next token after the prompt is still predicted from
    the last position, but every prompt token sees every other, as the encoder was pretrained to. It cannot
    extend a KV cache token by token (earlier positions would change), so multi-token sessions need causal.
    """
    from transformers import BertLMHeadModel

    if mode not in PROMPT_ATTENTION:
        raise ValueError(f"prompt_attention must be one of {PROMPT_ATTENTION}, got {mode!r}")
    if mode == "bidirectional" and not isinstance(model, BertLMHeadModel):
        raise ValueError(f"{type(model).__name__}: bidirectional prompt attention needs a BERT model")
    if isinstance(model, BertLMHeadModel):
        model.config.is_decoder = mode == "causal"
        for module in model.modules():
            if hasattr(module, "is_causal") and not getattr(module, "is_cross_attention", False):
                module.is_causal = mode == "causal"
            if hasattr(module, "is_decoder") and module is not model.config:
                module.is_decoder = mode == "causal"
    setattr(model.config, ATTENTION_KEY, mode)
    return model


def load_causal_lm(path: str | PathLike[str]) -> nn.Module:
    """Load a causal LM from a local folder; a BERT checkpoint becomes a tied-embedding decoder (or, when it
    was saved so, a bidirectional prompt reader: see :func:`set_prompt_attention`)."""
    folder = resolve_model_path(path)
    config = check_model_folder(folder)
    from transformers import AutoModelForCausalLM, BertLMHeadModel

    try:
        with _quiet_transformers():
            if config["model_type"] == "bert":
                model = BertLMHeadModel.from_pretrained(
                    str(folder), is_decoder=True, tie_word_embeddings=True, local_files_only=True
                )
            else:
                model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # transformers/safetensors raise many types for a bad folder
        raise ModelFolderError(f"cannot load a causal LM from {folder}: {type(err).__name__}: {err}") from err
    check_tied(model)
    return set_prompt_attention(model, config.get(ATTENTION_KEY, "causal"))


def check_tied(model: nn.Module) -> None:
    """Raise unless the output projection *is* the input embedding matrix when the config says tied."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "tie_word_embeddings", False):
        return
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or out.weight.data_ptr() != inp.weight.data_ptr():
        raise RuntimeError(f"{type(model).__name__}: config says tie_word_embeddings but the weights are separate")


@dataclass
class BackboneSpec:
    """How to obtain a causal LM: load ``pretrained`` if set, else build a random BERT decoder of this size."""

    pretrained: str | None = None
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 512
    max_position: int = 128
    embeddings_from: str | None = MINILM  # project these word/position embeddings onto hidden_size
    seed: int = 0
    prompt_attention: str | None = None  # "causal" | "bidirectional"; None: as saved (causal for a new model)


def bert_decoder_config(spec: BackboneSpec, vocab_size: int, pad_token_id: int = 0) -> Any:
    """A BertConfig for a causal decoder with tied input/output embeddings."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position,
        pad_token_id=pad_token_id,
        is_decoder=True,
        tie_word_embeddings=True,
    )


def project_embeddings(source: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA of an embedding matrix [V, D] -> (projected [V, dim], basis [D, dim]); keeps the top components."""
    if dim > source.shape[1]:
        raise ValueError(f"cannot project {source.shape[1]}-d embeddings up to {dim}")
    x = source.float()
    _, _, vh = torch.linalg.svd(x - x.mean(dim=0), full_matrices=False)
    basis = vh[:dim].T.contiguous()
    return x @ basis, basis


def build_bert_decoder(spec: BackboneSpec, vocab_size: int, pad_token_id: int = 0) -> nn.Module:
    """A random BERT decoder; with ``embeddings_from`` its word, position and type embeddings start
    as the PCA projection of that model's (same basis for all three, since BERT adds them)."""
    from transformers import BertLMHeadModel

    torch.manual_seed(spec.seed)
    model = BertLMHeadModel(bert_decoder_config(spec, vocab_size, pad_token_id))
    if spec.embeddings_from:
        source = load_causal_lm(spec.embeddings_from)
        src, dst = source.get_input_embeddings(), model.get_input_embeddings()
        if src.weight.shape[0] != vocab_size:
            raise ValueError(
                f"embeddings_from {spec.embeddings_from}: vocabulary {src.weight.shape[0]} differs from {vocab_size}"
            )
        words, basis = project_embeddings(src.weight.detach(), spec.hidden_size)
        with torch.no_grad():
            dst.weight.copy_(words)
            src_emb, dst_emb = source.base_model.embeddings, model.base_model.embeddings
            n = min(src_emb.position_embeddings.weight.shape[0], dst_emb.position_embeddings.weight.shape[0])
            dst_emb.position_embeddings.weight[:n].copy_(src_emb.position_embeddings.weight[:n] @ basis)
            dst_emb.token_type_embeddings.weight.copy_(src_emb.token_type_embeddings.weight @ basis)
        del source
    check_tied(model)
    return model


def build_backbone(spec: BackboneSpec, vocab_size: int, pad_token_id: int = 0) -> nn.Module:
    """Load ``spec.pretrained`` or build the random decoder ``spec`` describes."""
    if spec.pretrained:
        # an encoder checkpoint loaded as a causal LM gets a fresh prediction-head transform
        # (cls.predictions.transform.*): seeded, or two trainings of one config start apart
        torch.manual_seed(spec.seed)
        model = load_causal_lm(spec.pretrained)
        if model.get_input_embeddings().weight.shape[0] < vocab_size:
            raise ValueError(
                f"{spec.pretrained}: vocabulary {model.get_input_embeddings().weight.shape[0]} "
                f"is smaller than the tokenizer's {vocab_size}"
            )
    else:
        model = build_bert_decoder(spec, vocab_size, pad_token_id)
    return set_prompt_attention(model, spec.prompt_attention) if spec.prompt_attention else model


def save_model(model: nn.Module, folder: str | PathLike[str], tokenizer: Any | None = None) -> Path:
    """save_pretrained the model (and tokenizer) into ``folder``; returns the folder."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied matrices counted once)."""
    return sum(p.numel() for p in model.parameters())


def next_token_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor
) -> torch.Tensor:
    """Logits [B, V] of the token after position ``last_index`` of each (right-padded) row.

    For BERT decoders only the rows that matter go through the LM head (the vocabulary
    projection at every position would cost as much as the encoder); other models run
    their full forward and the rows are gathered.
    """
    from transformers import BertLMHeadModel

    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    if isinstance(model, BertLMHeadModel):
        hidden = model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return model.cls(hidden[rows, last_index])
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[rows, last_index]
