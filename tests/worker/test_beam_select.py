"""Beam selection on the device (services/worker/beam_select.py) picks exactly the K best totals
over all of beams x vocab, equal totals in (beam, token id) order whatever torch.topk does with
ties, banned stop ids left out, for several requests of different widths at once."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from services.worker.beam_select import BeamCandidate, BeamGroup, ordered_topk, select_beams, unpack


def host_merge(raw: torch.Tensor, group: BeamGroup) -> list[BeamCandidate]:
    """The definition over all of beams x vocab: totals in float64, sorted by (total desc, beam,
    token id), banned ids out, the first K; rank = place in the row by (logprob desc, token id)."""
    scored = []
    for b, (row, base) in enumerate(zip(group.rows, group.scores, strict=True)):
        values = raw[row].tolist()
        order = sorted(range(len(values)), key=lambda t: (-values[t], t))
        rank = {t: i + 1 for i, t in enumerate(order)}
        scored += [(-(base + v), b, t, v, rank[t]) for t, v in enumerate(values) if t not in group.banned]
    scored.sort()
    return [BeamCandidate(-neg, b, t, v, rank) for neg, b, t, v, rank in scored[: group.keep]]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", [False, True], ids=["torch-topk", "row-topk-kernel"])
def test_device_selection_equals_the_host_merge_with_ties_and_bans(device: str, kernel: bool) -> None:
    """`select_beams` equals the host merge, with ordered_topk's torch ops and with the kernel the
    runner passes on CUDA (kernels/triton/row_topk.py; Triton's interpreter on the CPU)."""
    row_topk = None
    if kernel:
        from kernels.triton.row_topk import row_topk
    gen = torch.Generator().manual_seed(0)
    vocab = 64
    # coarse logits: exact ties inside rows (fewer than K at the K-th place: ordered_topk is exact
    # then), and between beams
    logits = torch.randint(0, 40, (11, vocab), generator=gen).float() / 4
    raw = torch.log_softmax(logits, dim=-1)
    raw[4] = raw[3]  # two beams with the same row and score: ties across beams
    groups = [
        BeamGroup("a", [0, 1, 2, 3], [0.0, -1.5, -1.5, -2.0], keep=8, per_beam=8, banned=(), user_top=2),
        BeamGroup("b", [4, 5], [-2.0, -2.0], keep=6, per_beam=8, banned=(7, 9), user_top=0),
        BeamGroup("c", [6], [0.0], keep=4, per_beam=4, banned=(), user_top=3),
        BeamGroup("d", [8, 9, 10], [-0.25, -0.5, -0.75], keep=12, per_beam=12, banned=(1,), user_top=0),
    ]
    # row 7 belongs to another request, sampled in the same step
    selection = select_beams(raw.to(device), groups, row_topk=row_topk)
    assert selection.tops is not None and selection.table.device.type == device
    picks = unpack(groups, selection.per_beam, selection.table.tolist(), selection.tops.tolist())
    for group, pick in zip(groups, picks, strict=True):
        expected = host_merge(raw, group)
        assert [(c.beam, c.token_id, c.rank) for c in pick.candidates] == [
            (c.beam, c.token_id, c.rank) for c in expected
        ], group.request_id
        for got, want in zip(pick.candidates, expected, strict=True):
            assert got.total == want.total and got.logprob == want.logprob
        assert not {c.token_id for c in pick.candidates} & set(group.banned)
        assert len(pick.alternatives) == len(group.rows)
        for row, alternatives in zip(group.rows, pick.alternatives, strict=True):
            values = raw[row].tolist()
            order = sorted(range(len(values)), key=lambda t: (-values[t], t))[: group.user_top]
            assert alternatives == tuple((t, values[t]) for t in order)


def test_device_selection_with_a_vocabulary_smaller_than_k() -> None:
    raw = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]), dim=-1)
    group = BeamGroup("a", [0, 1], [0.0, -0.1], keep=8, per_beam=10, banned=(2,), user_top=0)
    selection = select_beams(raw, [group])
    [pick] = unpack([group], selection.per_beam, selection.table.tolist(), None)
    assert [(c.beam, c.token_id) for c in pick.candidates] == [
        (c.beam, c.token_id) for c in host_merge(raw, group)
    ]
    assert len(pick.candidates) == 4  # 2 beams x the 2 tokens that are not banned


@pytest.mark.parametrize("device", DEVICES)
def test_ordered_topk_puts_equal_values_in_token_id_order(device: str) -> None:
    inf = float("inf")
    row = [-inf, 0.0, -0.5, 2.0, -0.0, 2.0, -0.5, -3.0, 1e-30, -1e-30, 2.0]
    rows = torch.tensor([row, row[::-1]])
    values, ids = ordered_topk(rows.to(device), 9)
    expected = sorted(range(len(row)), key=lambda t: (-row[t], t))[:9]
    assert ids[0].tolist() == expected
    assert values[0].tolist() == rows[0, expected].tolist()
    mirrored = row[::-1]
    assert ids[1].tolist() == sorted(range(len(row)), key=lambda t: (-mirrored[t], t))[:9]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stops", [(), (5, 9)], ids=["no-stops", "stops"])
def test_candidate_kernel_equals_the_torch_selection(device: str, stops: tuple[int, ...]) -> None:
    """kernels/triton/beam_candidates.py (the runner's second stage on CUDA; Triton's interpreter
    on the CPU) gives `select_beams`' torch path's table, and the same next beams wherever some go
    on (past the last one going on, the torch path's columns are don't-cares: kept in range)."""
    from kernels.triton.beam_candidates import beam_candidates
    from kernels.triton.row_topk import row_topk

    gen = torch.Generator().manual_seed(3)
    vocab, width = 48, 4
    logits = torch.randint(0, 12, (3 * width, vocab), generator=gen).float() / 2  # ties everywhere
    logits[:, list(stops)] += 3.0  # stop ids among the best: some candidates end
    raw = torch.log_softmax(logits, dim=-1).to(device)
    groups = [
        BeamGroup(name, list(range(g * width, (g + 1) * width)), scores, keep=2 * width, per_beam=2 * width,
                  banned=(), user_top=1 if g == 1 else 0, stops=stops)
        for g, (name, scores) in enumerate(
            [("a", [0.0, -0.5, -0.5, -1.0]), ("b", [-2.0] * 4), ("c", [-0.25, -3.0, -0.25, -9.0])]
        )
    ]  # fmt: skip
    torch_path = select_beams(raw, groups, row_topk=row_topk)  # (the same first stage: exact with ties)
    kernel_path = select_beams(raw, groups, row_topk=row_topk, beam_candidates=beam_candidates)
    assert torch.equal(kernel_path.table.cpu(), torch_path.table.cpu())
    assert kernel_path.tops is not None and torch_path.tops is not None
    assert torch.equal(kernel_path.tops.cpu(), torch_path.tops.cpu())
    tokens = torch_path.table[:, :, 2].long().cpu()
    for g in range(len(groups)):
        going = min(width, sum(int(t) not in stops for t in tokens[g]))
        for got, want in (
            (kernel_path.parents, torch_path.parents),
            (kernel_path.tokens, torch_path.tokens),
            (kernel_path.totals, torch_path.totals),
        ):
            assert torch.equal(got[g, :going].cpu(), want[g, :going].cpu()), g
        assert int(kernel_path.parents[g].max()) < width
    if stops:  # the stop ids are among the best: some group has a candidate that ends
        assert any(int(t) in stops for t in tokens[:, :width].flatten())


def test_wide_searches_keep_the_torch_ops() -> None:
    """Past the sizes the kernels are for (KERNEL_MAX_K per row, KERNEL_MAX_CANDIDATES a request),
    the selection runs the torch ops, with the same result as without kernels."""
    from services.worker.beam_select import KERNEL_MAX_CANDIDATES, KERNEL_MAX_K

    called: list[str] = []

    def kernel(name: str) -> Any:
        def refuse(*args: Any) -> Any:
            called.append(name)
            raise AssertionError(f"{name} called past its sizes")

        return refuse

    width = KERNEL_MAX_CANDIDATES // KERNEL_MAX_K + 1
    per_beam = KERNEL_MAX_K + 1
    raw = torch.log_softmax(torch.randn(width, 4 * per_beam, generator=torch.Generator().manual_seed(5)), -1)
    group = BeamGroup(
        "w", list(range(width)), [0.0] * width, keep=2 * width, per_beam=per_beam, banned=(), user_top=0
    )
    want = select_beams(raw, [group])
    got = select_beams(raw, [group], row_topk=kernel("row_topk"), beam_candidates=kernel("beam_candidates"))
    assert not called and torch.equal(got.table, want.table) and torch.equal(got.parents, want.parents)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("width", "vocab", "per_beam", "k", "stops"),
    [
        (4, 48, 8, 8, ()),
        (4, 48, 8, 10, (5, 9)),  # the client's logprobs: each row's top k past per_beam
        (1, 37, 2, 2, (3,)),
        (8, 2 * 4096 + 7, 17, 17, (1,)),  # three chunks a row, ties across them
        (2, 4096, 5, 12, ()),
    ],
)
def test_one_launch_selection_equals_the_two_kernels(
    device: str, width: int, vocab: int, per_beam: int, k: int, stops: tuple[int, ...]
) -> None:
    """kernels/triton/beam_topk_candidates.py (both stages in one launch, each later stage run by
    the last program of the earlier one to finish) gives, bit for bit, row_topk's rows and
    beam_candidates' table and next beams, through `select_beams` as the runner calls it."""
    from kernels.triton.beam_candidates import beam_candidates
    from kernels.triton.beam_topk_candidates import beam_topk_candidates
    from kernels.triton.row_topk import row_topk

    gen = torch.Generator().manual_seed(vocab + width)
    num_groups = 3
    logits = torch.randint(0, 12, (num_groups * width, vocab), generator=gen).float() / 2  # ties everywhere
    if vocab > 4096:  # equal best values in every chunk: the merge must keep index order
        logits[:, [7, 4096 + 1, 2 * 4096 + 3]] = 9.0
    logits[:, list(stops)] += 3.0  # stop ids among the best: some candidates end
    raw = torch.log_softmax(logits, dim=-1).to(device)
    user_top = k if k > per_beam else 0
    groups = [
        BeamGroup(
            str(g),
            list(range(g * width, (g + 1) * width)),
            [-0.5 * ((g + b) % 3) for b in range(width)],
            keep=min(2 * width, width * per_beam),
            per_beam=per_beam,
            banned=(),
            user_top=user_top,
            stops=stops,
        )
        for g in range(num_groups)
    ]
    two = select_beams(raw, groups, row_topk=row_topk, beam_candidates=beam_candidates)
    one = select_beams(raw, groups, row_topk=row_topk, topk_candidates=beam_topk_candidates)
    for name in ("table", "parents", "tokens", "totals", "tops"):
        got, want = getattr(one, name), getattr(two, name)
        assert (got is None) == (want is None), name
        if got is not None:
            assert got.shape == want.shape and torch.equal(got.cpu(), want.cpu()), name
    # the counters are zeros again: a second launch gives the same
    again = select_beams(raw, groups, row_topk=row_topk, topk_candidates=beam_topk_candidates)
    assert torch.equal(again.table.cpu(), one.table.cpu())
