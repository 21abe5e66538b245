"""Compact context sketches for the edge's semantic cache: SimHash bits that estimate cosine similarity.

A client sends its edge B sign bits of random projections of its context embedding instead of the
embedding (32 bytes at B = 256 instead of 768 for MiniLM's float16 384 dims). For two unit vectors at
angle theta each bit differs with probability theta / pi (Charikar 2002), so the Hamming distance h
estimates cos(pi * h / B). The hyperplanes come from a named seed, so every client and edge with the
same sketch name draws the same ones; the name travels with the sketch so that unlike sketches are
never compared.
"""

from __future__ import annotations

import functools
import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint16)


@dataclass(frozen=True)
class SimHash:
    """`bits` random hyperplanes over `dim`-dimensional embeddings, drawn from `seed`."""

    bits: int = 256
    dim: int = 384
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bits <= 0 or self.bits % 8:
            raise ValueError(f"sketch bits must be a positive multiple of 8, got {self.bits}")
        if self.dim <= 0:
            raise ValueError(f"sketch dim must be > 0, got {self.dim}")

    @property
    def name(self) -> str:
        return f"simhash{self.bits}-s{self.seed}-d{self.dim}"

    @property
    def nbytes(self) -> int:
        return self.bits // 8

    def fingerprint(self, representation: str) -> int:
        """32 bits naming this family and what it sketches (`p2p.representation`), carried by every sketch."""
        return zlib.crc32(f"{self.name}/{representation}".encode())

    def sketch(self, embedding: np.ndarray) -> np.ndarray:
        """The packed sign bits (uint8, `bits / 8` bytes) of one embedding."""
        vec = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if vec.shape[0] != self.dim:
            raise ValueError(f"embedding has dimension {vec.shape[0]}, sketch {self.name} expects {self.dim}")
        return np.packbits(_planes(self.bits, self.dim, self.seed) @ vec >= 0)

    def max_distance(self, delta: float) -> int:
        """The largest Hamming distance whose estimated cosine still reaches `delta`."""
        theta = float(np.arccos(np.clip(delta, -1.0, 1.0)))
        return int(np.floor(self.bits * theta / np.pi + 1e-9))

    def cosine(self, distance: np.ndarray | int) -> np.ndarray:
        """Estimated cosine similarity for Hamming distances."""
        return np.cos(np.pi * np.asarray(distance, dtype=np.float64) / self.bits)


def hamming(query: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Hamming distances between one packed sketch [B/8] and each row of a packed table [N, B/8]."""
    return _POPCOUNT[np.bitwise_xor(table, query[None, :])].sum(axis=1)


@functools.lru_cache(maxsize=8)
def _planes(bits: int, dim: int, seed: int) -> np.ndarray:
    planes = np.random.default_rng(seed).standard_normal((bits, dim)).astype(np.float32)
    planes.setflags(write=False)
    return planes


def prefix_key(tokens: Sequence[int]) -> int:
    """A 32-bit digest of a generated prefix (never 0, the key of entries that need none): a cached
    generation token is reused only where the tokens generated before it are exactly these. 32 bits: it
    only tells apart the prefixes of prompts similar enough to match, and it travels with every token."""
    digest = hashlib.blake2b(np.asarray(tokens, dtype="<i4").tobytes(), digest_size=4).digest()
    return int.from_bytes(digest, "little") or 1


def content_draw(seed: int, tokens: Sequence[int]) -> float:
    """A number in [0, 1) fixed by a context's tokens and the run's seed, uniform over contexts.

    Exploration draws it instead of a fresh random number: every device that sees the same text
    makes the same draw, so the fleet explores a share of its *texts*, each at every delivery, and a
    repeat of an explored text can take its label from the cache that the first delivery filled. Over
    distinct texts it is still a uniform sample (the digest knows nothing of the features), so the
    importance weight 1 / rate stays right."""
    key = (int(seed) & (2**64 - 1)).to_bytes(8, "little")
    digest = hashlib.blake2b(np.asarray(tokens, dtype="<i4").tobytes(), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") / 2.0**64
