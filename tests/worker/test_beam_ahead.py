"""kernels/triton/beam_ahead.py (the inputs of a beam step launched ahead, on CUDA; Triton's
interpreter on the CPU) against its definition in torch ops (BeamStep.ahead's torch path): each
entry's table is its parent's, cut or zero-padded to max_blocks, with its tail block at `shared`;
the source of its partly filled block's copy is the parent's block there; its token lands at its
row of the step's ids."""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def reference(
    parents: torch.Tensor,
    tokens: torch.Tensor,
    slot_tables: torch.Tensor,
    places: torch.Tensor,
    shared: torch.Tensor,
    tails: torch.Tensor,
    max_blocks: int,
    ids: torch.Tensor | None,
    positions: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = parents.shape[1]
    parent = parents.take(places)
    tables = slot_tables[places // width, parent]  # [n, w_prev]
    w_prev = tables.shape[1]
    src = torch.where(shared < w_prev, tables.gather(1, shared.clamp(max=w_prev - 1).view(-1, 1)).view(-1), 0)
    if w_prev < max_blocks:
        tables = torch.nn.functional.pad(tables, (0, max_blocks - w_prev))
    tables = tables[:, :max_blocks].clone()
    keep = shared < max_blocks
    tables[keep.nonzero().view(-1), shared[keep]] = tails[keep].to(torch.int32)
    picked = tokens.take(places)
    out = picked if ids is None else ids.clone().index_copy(0, positions, picked)
    return tables, src.long(), out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_prev,max_blocks", [(5, 5), (5, 9), (9, 4), (3, 200)])
@pytest.mark.parametrize("with_positions", [False, True], ids=["beams-only", "among-others"])
def test_beam_ahead_kernel_equals_its_definition(
    device: str, w_prev: int, max_blocks: int, with_positions: bool
) -> None:
    from kernels.triton.beam_ahead import beam_ahead

    gen = torch.Generator().manual_seed(w_prev * 1000 + max_blocks + with_positions)
    num_groups, width = 3, 4
    parents = torch.randint(0, width, (num_groups, width), generator=gen)
    tokens = torch.randint(0, 50_000, (num_groups, width), generator=gen)
    slot_tables = torch.randint(1, 1000, (num_groups, width, w_prev), generator=gen, dtype=torch.int32)
    # entries: every live beam of groups 2 and 0 (not in group order), one of group 1
    places = torch.tensor([2 * width + j for j in range(width)] + [0, 1, 2, 3] + [width + 2])
    n = places.shape[0]
    # the next position's column: inside the parent's table (a partly filled block), or one past
    # its last block (a fresh one); never past max_blocks (the runner sizes it so)
    shared = torch.randint(0, min(w_prev + 1, max_blocks), (n,), generator=gen)
    tails = torch.randint(1000, 2000, (n,), generator=gen)
    ids = positions = None
    if with_positions:  # the step has other rows: the entries' rows among them
        num_rows = n + 5
        ids = torch.randint(0, 50_000, (num_rows,), generator=gen)
        positions = torch.randperm(num_rows, generator=gen)[:n]
    want = reference(parents, tokens, slot_tables, places, shared, tails, max_blocks, ids, positions)

    def on(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    # parents and tokens as the selection leaves them may be views of a wider tensor: strided
    wide = torch.zeros(num_groups, 2 * width, dtype=torch.int64)
    wide[:, ::2] = parents
    got = beam_ahead(
        on(wide)[:, ::2],  # type: ignore[index]
        tokens.to(device),
        slot_tables.to(device),
        places.to(device),
        shared.to(device),
        tails.to(device),
        max_blocks,
        on(None if ids is None else ids.clone()),
        on(positions),
    )
    for name, g, w in zip(("tables", "src", "ids"), got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g.cpu(), w), name
