"""Rank 0 of a worker group driving its KV cache and host KV tier by hand (no forward): the host
tier's copies reach the other ranks ahead of a block copy and of a disaggregation read, not only
with a Forward, and each rank makes them in rank 0's order. Writes what it found as JSON.

    python tests/parallel/tp_host_kv.py OUT.json -- <tandem worker options>

The order matters here: a prefix block is evicted to the host (a pending device -> host copy) and
at once overwritten by a block copy into it; a rank that made the copy first would keep the
overwritten bytes. Then the prefix comes back from the host and the group's KV of its blocks is
read through ReadKV (every rank's heads and layers) and compared with what was written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(argv: list[str]) -> int:
    out_path, sep, *worker_argv = argv
    assert sep == "--"
    from services.common.config import parse_config
    from services.worker.block_manager import BlockManager
    from services.worker.config import WorkerConfig
    from services.worker.kv_offload import HostKVTier
    from services.worker.model_config import load_model_config
    from services.worker.request import EngineRequest, Request, SamplingParams
    from services.worker.tp_group import BindKV, DrivenKVCache, StepDriver
    from services.worker.tp_launch import start_group
    from tests.parallel.forkserver import fork_ranks

    fork_ranks()  # the group's other ranks as forks of this process (tests/parallel/forkserver.py)
    config = parse_config(WorkerConfig, worker_argv, "tp_host_kv")
    group = start_group(config, worker_argv).local
    driver = StepDriver(config.distributed_timeout)
    try:
        cfg = load_model_config(config.model)
        bs, num_blocks, host_blocks = config.block_size, 4, 2
        driver.send(BindKV(num_blocks, host_blocks))
        kv = DrivenKVCache(cfg, num_blocks, bs, torch.float32, torch.device("cpu"))
        kv.driver = driver
        tier = HostKVTier(kv.tensor, host_blocks, driver.stage_host_kv)
        bm = BlockManager(num_blocks, bs, True, None, tier)
        layers = cfg.num_layers

        def model_layout(n: int, seed: int) -> torch.Tensor:  # n blocks of the whole model's KV
            gen = torch.Generator().manual_seed(seed)
            return torch.randn((layers, 2, n, bs, cfg.num_kv_heads, cfg.head_dim), generator=gen)

        tokens = tuple(range(3, 3 + 2 * bs + 1))  # 2 full blocks (the lookup leaves the last token)
        prefix = Request(EngineRequest("p", tokens, SamplingParams()), 8, (2,), 0).sequences[0]
        bm.allocate(prefix, len(tokens))
        written = model_layout(2, seed=1)
        kv.write_blocks(0, layers, prefix.block_ids[:2], written)  # each rank gets its part
        prefix.num_computed_tokens = len(tokens)
        bm.register_computed_blocks(prefix)
        prefix_blocks = prefix.block_ids[:2]
        bm.free_sequence(prefix)  # its 2 blocks stay cached in the free pool

        first = bm.allocate_block()  # the free uncached blocks go first
        other = bm.allocate_block()
        kv.write_blocks(0, layers, [other], model_layout(1, seed=2))
        evicted = bm.allocate_block()  # the prefix's older block: saved to the host (pending) ...
        assert evicted in prefix_blocks and tier.num_saved == 1
        kv.copy_blocks([(other, evicted)])  # ... and overwritten by a block copy at once
        last = bm.allocate_block()  # the prefix's other block: saved too
        for block in (first, other, evicted, last):
            bm.release_block(block)

        again = Request(EngineRequest("q", tokens, SamplingParams()), 8, (2,), 0).sequences[0]
        hits = bm.find_cached_prefix(again)  # both blocks come back from the host (pending loads)
        read = kv.read_blocks(0, layers, tuple(hits))  # the loads reach the ranks before the read
        result = {
            "hits": len(hits),
            "saved": tier.num_saved,
            "loaded": tier.num_loaded,
            "equal": bool(torch.equal(read, written)),
        }
        Path(out_path).write_text(json.dumps(result))
    finally:
        driver.close()
        if group is not None:
            group.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
