"""The random numbers of sampling: one counter-based generator, the same on every device.

A draw is a pure function of (seed, choice index, output position, token id), in int64 torch ops
that give the same bits on the CPU and on a GPU:

    row_key(seed, choice, position) = mix(mix(seed ^ mix(choice * G)) ^ position)      [S]
    token_key(token)                = mix(token * G)                                     [V]
    bits                            = ((row_key ^ token_key) * M) >>> 41                 23 bits
    u                               = (bits + 0.5) / 2**23                               in (0, 1)
    q                               = -log(u)                                            ~ Exp(1)
    token                           = argmax(probs / q)                                  the exponential race

`mix` is splitmix64's finalizer, G the golden-ratio constant, M splitmix64's last multiplier; int64
products wrap as unsigned ones do, and `>>>` is a logical shift. The exponential race draws a
token with probability `probs` (it is Gumbel-max in disguise: -log q is Gumbel), so the filters,
temperature and penalties only shape `probs`. u is never 0 or 1 (23 bits plus a half keep it
strictly inside in float32), so q > 0 and a token of probability 0 never wins.

A seeded request therefore gives the same tokens whatever the batch, the step, the worker or the
device, wherever the logits agree; an unseeded one gets a seed drawn once when the engine admits
it (`Engine.add_request`).
"""

from __future__ import annotations

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def as_int64(value: int) -> int:
    """An unsigned 64-bit value as the signed int64 torch stores (the same bits)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = as_int64(0x9E3779B97F4A7C15)
_MIX1 = as_int64(0xBF58476D1CE4E5B9)
_MIX2 = as_int64(0x94D049BB133111EB)
UNIFORM_BITS = 23


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer (a bijection of 64-bit values with full avalanche)."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def draw_table(rows: list[tuple[int, int, int]]) -> torch.Tensor:
    """[S, 3] int64 (seed as int64 bits, choice index, output position) of each row, on the CPU.
    (numpy takes the uint64 seeds as they are and builds the table in one call, per step.)"""
    table = np.array(rows, dtype=np.uint64).reshape(-1, 3).view(np.int64)
    return torch.from_numpy(table)


def row_keys(draws: torch.Tensor) -> torch.Tensor:
    """[S] int64 keys of the rows' draws from their draw table [S, 3] (draw_table)."""
    seeds, choices, positions = draws.unbind(dim=1)
    return _mix(_mix(seeds ^ _mix(choices * _GOLDEN)) ^ positions)


_token_keys: dict[tuple[torch.device, int], torch.Tensor] = {}


def token_keys(vocab: int, device: torch.device) -> torch.Tensor:
    """[V] int64 mix(token * G), kept per device and vocabulary size (built once, then reused)."""
    keys = _token_keys.get((device, vocab))
    if keys is None:
        keys = _token_keys[(device, vocab)] = _mix(
            torch.arange(vocab, dtype=torch.int64, device=device) * _GOLDEN
        )
    return keys


def uniform(draws: torch.Tensor, vocab: int) -> torch.Tensor:
    """[S, V] float32 in (0, 1): the draw of every (row, token) from the draw table [S, 3]."""
    x = row_keys(draws)[:, None] ^ token_keys(vocab, draws.device)[None, :]
    x = _shr(x.mul_(_MIX2), 64 - UNIFORM_BITS)
    return x.float().add_(0.5).mul_(1.0 / (1 << UNIFORM_BITS))


def exponential(draws: torch.Tensor, vocab: int) -> torch.Tensor:
    """[S, V] float32 Exp(1) noise, strictly positive: -log(uniform)."""
    return uniform(draws, vocab).log_().neg_()


def exponential_race(probs: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """[S] int64: each row's token drawn from probs [S, V] (float32, rows summing to 1, zeros
    allowed) with the rows' draw table [S, 3] int64."""
    return (probs / exponential(draws, probs.shape[1])).argmax(dim=-1)


def uniform_at(draws: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """[S] float32 in (0, 1): `uniform(draws, vocab)[s, token_ids[s]]` without the [S, V] table."""
    x = row_keys(draws) ^ _mix(token_ids.to(torch.int64) * _GOLDEN)
    x = _shr(x * _MIX2, 64 - UNIFORM_BITS)
    return (x.float() + 0.5) * (1.0 / (1 << UNIFORM_BITS))
