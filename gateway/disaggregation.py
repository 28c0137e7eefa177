"""Disaggregated prefill/decode in the gateway: the prefill pool and which workers may pair.

    --prefill-worker P ...   a Router of its own (least load, prefix affinity), polled like the rest
    --decode-worker D ...    joins the main Router (with any --worker): they serve Generate

A request first picks its decode worker, then a prefill worker whose KV it can take: equal
`Info.fingerprint` (model, dtype, block size, KV cache dtype, the model's KV layout). Pairs that
differ are refused, and the gateway says why once, at start-up (or when a worker first
answers): "prefill P cannot pair with decode D: block size 16 != 32". Tensor / pipeline parallel
layouts may differ: KV moves in the model's layout and each group re-shards it onto its ranks
(services/worker/kv_reshard.py); the gateway logs such a pair once.

`worker_stream.py` runs the request: Prefill on P (first token streamed to the client at once),
then Generate on D with the handle, and the fallbacks when either dies.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc

from gateway.downstream import WorkerInfo
from gateway.router import NoWorkerAvailable, Router, WorkerState

log = logging.getLogger(__name__)

# Info fields that must agree for two workers to exchange KV, with the words used to report them.
_COMPATIBILITY_FIELDS = (
    ("model_name", "model"),
    ("architecture", "architecture"),
    ("dtype", "dtype"),
    ("block_size", "block size"),
    ("kv_dtype", "KV cache dtype"),
    ("kv_layout", "KV layout"),
)


def incompatibility(prefill: WorkerInfo, decode: WorkerInfo) -> str:
    """Why these two workers cannot exchange KV ("" when they can)."""
    reasons = [
        f"{words} {getattr(prefill, name)!r} != {getattr(decode, name)!r}"
        for name, words in _COMPATIBILITY_FIELDS
        if getattr(prefill, name) != getattr(decode, name)
    ]
    if not reasons and prefill.fingerprint != decode.fingerprint:
        reasons.append(f"fingerprint {prefill.fingerprint} != {decode.fingerprint}")
    return "; ".join(reasons)


class Disaggregation:
    """The prefill pool and the pairing rule."""

    def __init__(
        self,
        prefill_addresses: Sequence[str],
        poll_interval_s: float = 1.0,
        credentials: grpc.ChannelCredentials | None = None,
        layerwise: bool = True,
        exact: bool = True,
    ) -> None:
        self.prefill = Router(
            prefill_addresses, poll_interval_s, credentials, kind="prefill_worker", exact=exact
        )
        self.layerwise = layerwise  # --kv-layerwise-push
        self._reported: set[tuple[str, str]] = set()  # (prefill, decode) pairs already explained
        self._resharded: set[tuple[str, str]] = set()  # pairs of different parallel layouts, logged

    async def start(self, decode: Router) -> None:
        await self.prefill.start()
        self.check_pairs(decode)

    async def close(self) -> None:
        await self.prefill.close()

    def check_pairs(self, decode: Router) -> list[str]:
        """Log (once per pair) every prefill/decode pair that cannot exchange KV; return the lines."""
        lines: list[str] = []
        for p in self.prefill.workers:
            if p.info is not None and p.info.role == "decode":
                self._report(p.address, "", f"prefill worker {p.address} reports role 'decode'", lines)
            for d in decode.workers:
                if p.info is None or d.info is None:
                    continue
                why = incompatibility(p.info, d.info)
                if why:
                    line = (
                        f"refusing to pair prefill worker {p.address} with decode worker {d.address}: {why} "
                        "(requests sent to that decode worker compute their prompts there)"
                    )
                    self._report(p.address, d.address, line, lines)
                elif (
                    p.info.parallel_layout != d.info.parallel_layout
                    and (p.address, d.address) not in self._resharded
                ):
                    self._resharded.add((p.address, d.address))
                    log.info(
                        "prefill worker %s (%s) pairs with decode worker %s (%s): KV re-sharded on fetch",
                        p.address,
                        p.info.parallel_layout,
                        d.address,
                        d.info.parallel_layout,
                    )
        return lines

    def _report(self, p: str, d: str, line: str, lines: list[str]) -> None:
        lines.append(line)
        if (p, d) not in self._reported:
            self._reported.add((p, d))
            log.error("%s", line)

    def pick_prefill(
        self,
        prompt_token_ids: Sequence[int],
        decode: WorkerState,
        exclude: Sequence[WorkerState] = (),
        lora_name: str = "",
    ) -> WorkerState | None:
        """A healthy prefill worker compatible with `decode` (least load, prefix affinity), or None."""
        if decode.info is None:
            return None
        incompatible = [
            p for p in self.prefill.workers if p.info is None or incompatibility(p.info, decode.info)
        ]
        if incompatible:
            self.check_pairs_of(decode)
        try:
            return self.prefill.pick(prompt_token_ids, exclude=[*exclude, *incompatible], lora_name=lora_name)
        except NoWorkerAvailable:
            return None

    def check_pairs_of(self, decode: WorkerState) -> None:
        """Explain (once) why some prefill workers cannot serve `decode` (a worker seen late)."""
        for p in self.prefill.workers:
            if p.info is not None and decode.info is not None:
                why = incompatibility(p.info, decode.info)
                if why:
                    self._report(
                        p.address,
                        decode.address,
                        f"refusing to pair prefill worker {p.address} with decode worker {decode.address}: {why}",
                        [],
                    )
