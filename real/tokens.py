"""Workload block ids -> the token ids a real server sees.

The canonical table describes a prompt by its prefix block ids (equal id at equal position = equal
content). A real vLLM needs token ids, so each block id expands to ``hash_block_size`` tokens that
depend on the id alone: two prompts that share a chain of ids share the exact tokens and therefore
hit vLLM's prefix cache exactly where the simulator says they do. Tokens the block ids do not cover
are unique to the request. Token values are a counter-based hash (splitmix64) of (id, position), so
the expansion is vectorised, needs no memo table and is identical in every process.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from traces.shared import splitmix64

FIRST_TOKEN_ID = 3  # keep clear of the usual <unk>/<s>/</s> ids 0-2
_BLOCK_SALT = np.uint64(0x5DEECE66D1CE4E5B)  # domain separation: block content vs per-request filler
_REQUEST_SALT = np.uint64(0xA0761D6478BD642F)


def _to_vocab(h: np.ndarray, vocab_size: int) -> np.ndarray:
    return (h % np.uint64(vocab_size - FIRST_TOKEN_ID)).astype(np.int64) + FIRST_TOKEN_ID


def prompt_token_ids(block_hashes: Sequence[int], hash_block_size: int, input_tokens: int, request_id: int,
                     vocab_size: int) -> list[int]:
    """The ``input_tokens`` prompt token ids of one call, in [3, vocab_size).

    Block ``k`` fills positions ``[k*hash_block_size, (k+1)*hash_block_size)`` with tokens seeded by its
    id only; positions past the last block are seeded by ``request_id`` (salted apart from block ids).
    """
    if vocab_size <= FIRST_TOKEN_ID + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small; token ids start at {FIRST_TOKEN_ID}")
    if hash_block_size < 1 or input_tokens < 1:
        raise ValueError(f"hash_block_size={hash_block_size} and input_tokens={input_tokens} must be >= 1")
    ids = np.asarray(block_hashes, dtype=np.int64).view(np.uint64)
    seeds = splitmix64(ids ^ _BLOCK_SALT)
    offsets = np.arange(hash_block_size, dtype=np.uint64)
    blocks = _to_vocab(splitmix64(seeds[:, None] + offsets[None, :]), vocab_size).ravel()[:input_tokens]
    rest = input_tokens - len(blocks)
    if rest == 0:
        return blocks.tolist()
    seed = splitmix64(np.asarray([request_id], dtype=np.int64).view(np.uint64) ^ _REQUEST_SALT)
    positions = np.arange(len(blocks), input_tokens, dtype=np.uint64)
    filler = _to_vocab(splitmix64(seed + positions), vocab_size)
    return np.concatenate([blocks, filler]).tolist()
