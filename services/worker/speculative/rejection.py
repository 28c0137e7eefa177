"""Verification of proposed tokens with the exact output distribution (Leviathan et al. 2023,
Chen et al. 2023): the tokens a step emits are distributed as the target's, whatever the drafts.

At draft position j the target's processed distribution is p_j (penalties, temperature, top-k/p,
min-p and the grammar mask applied, as the sampler does) and the draft d_j was drawn from q_j:

- greedy rows keep a draft while it is the target's argmax; the first mismatch is replaced by the
  argmax: exactly the tokens decoding without speculation gives;
- a draft distribution q (a draft model): d_j is kept with probability min(1, p_j(d_j) / q_j(d_j))
  (`u * q <= p` for a uniform u); the first rejected one is replaced by a draw from the residual
  norm(max(p_j - q_j, 0));
- a point mass (draft-free proposals, q_j = one-hot d_j): the rule above keeps d_j with probability
  p_j(d_j) and replaces it by a draw from p_j restricted to the other tokens. Drawing t_j ~ p_j with
  the sampler's own random numbers and keeping d_j iff t_j == d_j is that rule (P(keep) = p_j(d_j);
  t_j given t_j != d_j is p_j restricted and renormalized), and emits the very token decoding
  without speculation would draw at that position: a seeded request gives the same tokens.

When every draft is kept the target's token at position K (drawn from p_K) is the bonus token.

All random numbers come from the counter-based generator (sampling_rng.py), keyed by the
request's seed, the choice and the output position, so a seeded request is reproducible.
"""

from __future__ import annotations

import torch

from services.worker.sampling_rng import as_int64, exponential_race, uniform_at

# Salts of the acceptance uniforms and of a draft model's own draws: streams of the same seed that
# never meet the sampler's (seed, choice, position) draws.
ACCEPT_SALT = as_int64(0x5EC0_ACCE_97ED_0001)
DRAFT_SALT = as_int64(0x5EC0_D4AF_7000_0002)


def salted(draws: torch.Tensor, salt: int) -> torch.Tensor:
    """A draw table [R, 3] (seed, choice, position) whose seeds are xor-ed with `salt`."""
    out = draws.clone()
    out[:, 0] ^= salt
    return out


def reject_rows(
    p: torch.Tensor,  # [R, V] float32 target probabilities at the draft positions
    q: torch.Tensor,  # [R, V] float32 draft probabilities the drafts were drawn from
    drafts: torch.Tensor,  # [R] int64 the drafts
    draws: torch.Tensor,  # [R, 3] int64 the positions' draw table (sampler's keys)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: whether its draft is kept ([R] bool) and the replacement token drawn from the
    residual distribution ([R] int64; used only at the first rejected row)."""
    index = drafts[:, None]
    p_d = p.gather(1, index)[:, 0]
    q_d = q.gather(1, index)[:, 0]
    u = uniform_at(salted(draws, ACCEPT_SALT), drafts)  # in (0, 1): never keeps a p = 0 draft
    keep = u * q_d <= p_d
    residual = (p - q).clamp_(min=0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    # p == q leaves nothing: such a row is always kept (u < 1), its replacement never used
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p)
    return keep, exponential_race(residual, draws)


def emitted_tokens(drafts: list[int], keep: list[bool], replacements: list[int], bonus: int) -> list[int]:
    """The tokens a verified sequence appends: its drafts up to the first rejected one, then that
    row's replacement; all K kept: the K drafts and the bonus token."""
    for j, kept in enumerate(keep):
        if not kept:
            return [*drafts[:j], replacements[j]]
    return [*drafts, bonus]


def point_mass_keep(target_tokens: list[int], drafts: list[int]) -> list[bool]:
    """Greedy rows and draft-free proposals: a draft is kept where the target drew it (the
    target's tokens are then also the replacements and the bonus)."""
    return [t == d for t, d in zip(target_tokens, drafts, strict=False)]
