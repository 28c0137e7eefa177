"""Which worker serves a request: the fewest new prefill blocks plus load, by exact knowledge of
each worker's prefix cache where the workers stream KV events (kv_index.py); otherwise least load,
preferring the worker that served the same prefix (a guess from this gateway's own history),
which is all that `--routing affinity` uses.

A background task polls every worker's health and `GetLoad`; a worker that stops answering (or
whose stream fails with UNAVAILABLE) leaves the rotation and comes back once its health check
says SERVING again. Load is the worker's last reported running + waiting requests plus the
requests this gateway sent it since (so a burst between two polls still spreads out).

An address `dns:HOST:PORT` stands for every address HOST resolves to, re-resolved at each poll:
behind a Kubernetes headless Service that is one worker per ready pod, so pods that scale in or
out join and leave the rotation by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import socket
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from gateway.clients import WorkerClient
from gateway.downstream import WorkerInfo
from gateway.generate_mux import GenerateMuxCounts
from gateway.kv_index import KvEventFollower, KvIndex
from gateway.openengine_client import PREFIX as OPENENGINE_PREFIX
from gateway.openengine_client import OpenEngineWorkerClient
from gateway.poller import Poller
from gateway.sent_images import SentImages
from gateway.smg_client import PREFIX as SMG_PREFIX
from gateway.smg_client import SmgWorkerClient
from services.common.block_hash import ROOT_HASH, block_hashes, lora_root_hash

log = logging.getLogger(__name__)

# Prompt prefixes are remembered at this granularity (a typical KV block size).
PREFIX_CHUNK = 16
# At most this many prefix chunks per prompt are hashed (long prompts share their head).
MAX_PREFIX_CHUNKS = 64
# A worker holding the prefix wins unless it carries this many more requests than the least loaded.
AFFINITY_SLACK = 4
PREFIX_TABLE_SIZE = 100_000
# Exact routing: a request already on a worker costs as much as prefilling this many blocks, so a
# long cached prefix outweighs a little load and a busy worker loses to an idle one for short ones.
LOAD_COST_BLOCKS = 4
DNS_PREFIX = "dns:"
# Health checks in a row without an answer in time that take a worker out of rotation (as
# Kubernetes' failureThreshold): one slow answer on a loaded host is not a dead worker.
MISSED_CHECKS_OUT = 3


class NoWorkerAvailable(Exception):
    """No worker is in rotation."""


class NoWorkerForTask(NoWorkerAvailable):
    """Workers are in rotation, but none serves the request's task (--task generate / embed)."""


@dataclass
class WorkerState:
    client: WorkerClient | OpenEngineWorkerClient | SmgWorkerClient
    name: str = ""  # "worker-0": what /health and /metrics show unless --expose-internal-addresses
    healthy: bool = False
    info: WorkerInfo | None = None
    reported_load: int = 0  # running + waiting at the last poll
    in_flight: int = 0  # requests this gateway has open on the worker
    sent_since_poll: int = 0
    num_served: int = 0
    failures: int = field(default=0)
    missed_checks: int = 0  # health checks in a row that got no answer in time
    # LoRA adapters it serves: name -> content digest (ListLoRAs at each poll, and load/unload)
    loras: dict[str, str] = field(default_factory=dict)
    # Images its encoder cache holds as far as this gateway knows (sent as their hash alone)
    sent_images: SentImages = field(default_factory=SentImages)

    @property
    def address(self) -> str:
        return self.client.address

    @property
    def load(self) -> int:
        return max(self.reported_load + self.sent_since_poll, self.in_flight)


def prefix_keys(token_ids: Sequence[int], lora_name: str = "") -> list[bytes]:
    """Hash chain over the prompt's full PREFIX_CHUNK-token chunks, shortest prefix first (a
    prompt under a LoRA adapter has keys of its own: its KV is the adapter's)."""
    keys: list[bytes] = []
    h = hashlib.blake2b(digest_size=16, person=b"lora" if lora_name else b"")
    if lora_name:
        h.update(lora_name.encode())
    num_chunks = min(len(token_ids) // PREFIX_CHUNK, MAX_PREFIX_CHUNKS)
    # every id as 4 little-endian bytes, packed once (not a Python call per id)
    size = num_chunks * PREFIX_CHUNK
    packed = struct.pack(f"<{size}I", *token_ids[:size])
    step = PREFIX_CHUNK * 4
    for i in range(num_chunks):
        h.update(packed[i * step : (i + 1) * step])
        keys.append(h.copy().digest())
    return keys


def worker_client(
    address: str, credentials: grpc.ChannelCredentials | None, counts: GenerateMuxCounts | None = None
) -> WorkerClient | OpenEngineWorkerClient | SmgWorkerClient:
    """tandem's Worker service, OpenEngine for `openengine:HOST:PORT`, SMG's vllm_engine for
    `smg:HOST:PORT` (docs/protocols.md); `counts` adds up the GenerateMany streams' messages."""
    if address.startswith(OPENENGINE_PREFIX):
        return OpenEngineWorkerClient(address, credentials)
    if address.startswith(SMG_PREFIX):
        return SmgWorkerClient(address, credentials)
    return WorkerClient(address, credentials, counts)


async def _list_loras(client: WorkerClient) -> dict[str, str]:
    """The worker's adapters; none from a worker without the rpc (an older version)."""
    try:
        return await client.list_loras()
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            return {}
        raise


class Router:
    """The pool of workers and the choice of one per request."""

    def __init__(
        self,
        addresses: Sequence[str],
        poll_interval_s: float = 1.0,
        credentials: grpc.ChannelCredentials | None = None,
        kind: str = "worker",
        exact: bool = True,
    ) -> None:
        """`exact`: route by the workers' KV events where they stream them (--routing exact);
        False: by the prefix-affinity guess alone, without subscribing (--routing affinity)."""
        self._credentials = credentials
        self.exact = exact
        # Names are never reused, so a metric labelled by name counts one worker (DNS members come and go).
        self._names = (f"{kind}-{i}" for i in itertools.count())
        self._dns_names = [a.removeprefix(DNS_PREFIX) for a in addresses if a.startswith(DNS_PREFIX)]
        self._dns_members: dict[str, set[str]] = {name: set() for name in self._dns_names}
        self._retiring: set[asyncio.Task[None]] = set()
        self.generate_counts = GenerateMuxCounts()  # every worker's GenerateMany streams (/metrics)
        self.workers = [
            WorkerState(worker_client(a, credentials, self.generate_counts), next(self._names))
            for a in addresses
            if not a.startswith(DNS_PREFIX)
        ]
        self.poll_interval_s = poll_interval_s
        self._prefix_owner: OrderedDict[bytes, str] = OrderedDict()
        self._round_robin = itertools.count()
        self._poller = Poller(self.poll_once, poll_interval_s, "worker")
        self.kv_index = KvIndex()
        self._followers: dict[str, KvEventFollower] = {}
        self.num_exact_routes = 0  # picks decided by the KV index (tests, /metrics)

    def healthy_workers(self) -> list[WorkerState]:
        return [w for w in self.workers if w.healthy]

    def info(self) -> WorkerInfo | None:
        """Info of any worker that answered (they serve the same model)."""
        for w in self.workers:
            if w.info is not None:
                return w.info
        return None

    def tasks(self) -> set[str]:
        """The tasks (--task) of the workers that answered Info."""
        return {w.info.task for w in self.workers if w.info is not None}

    def task_info(self, task: str) -> WorkerInfo | None:
        """Info of a worker serving `task`, None when none answered."""
        return next((w.info for w in self.workers if w.info is not None and w.info.task == task), None)

    async def start(self) -> None:
        await self._poller.start()

    async def close(self) -> None:
        await self._poller.stop()
        for follower in self._followers.values():
            await follower.stop()
        for task in self._retiring:
            task.cancel()
        for w in self.workers:
            await w.client.close()

    async def poll_once(self) -> None:
        await self._resolve_dns()
        await asyncio.gather(*(self._poll(w) for w in self.workers))

    async def _resolve_dns(self) -> None:
        """Make the workers behind each `dns:` name match what the name resolves to now."""
        loop = asyncio.get_running_loop()
        for name in self._dns_names:
            host, _, port = name.rpartition(":")
            try:
                infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except (OSError, ValueError) as exc:
                log.warning("cannot resolve workers at %s (keeping the last answer): %s", name, exc)
                continue
            resolved = {
                f"[{info[4][0]}]:{port}" if info[0] == socket.AF_INET6 else f"{info[4][0]}:{port}"
                for info in infos
            }
            for address in sorted(resolved - self._dns_members[name]):
                log.info("worker %s joined (via %s)", address, name)
                self.workers.append(
                    WorkerState(
                        WorkerClient(address, self._credentials, self.generate_counts), next(self._names)
                    )
                )
            for address in self._dns_members[name] - resolved:
                log.info("worker %s left (via %s)", address, name)
                follower = self._followers.pop(address, None)
                if follower is not None:
                    await follower.stop()
                for w in [w for w in self.workers if w.address == address]:
                    self.workers.remove(w)
                    self._retiring.add(asyncio.create_task(self._close_when_idle(w)))
            self._dns_members[name] = resolved

    async def _close_when_idle(self, w: WorkerState) -> None:
        """Close a departed worker's channel once its in-flight streams (a draining pod's) end."""
        while w.in_flight > 0:
            await asyncio.sleep(0.5)
        await w.client.close()

    async def _poll(self, w: WorkerState) -> None:
        answer = await w.client.healthy(timeout_s=min(1.0, self.poll_interval_s * 2))
        if answer:
            try:
                if w.info is None:
                    w.info = await w.client.info()
                    w.sent_images.resize(w.info.encoder_cache_size)
                load = await w.client.load()
                w.reported_load = load.num_running + load.num_waiting
                w.sent_since_poll = 0
                if isinstance(w.client, WorkerClient):
                    w.loras = await _list_loras(w.client)
            except Exception as exc:
                # Info/GetLoad late (a worker whose engine is busy with one request's long mask
                # computation on a loaded host) is a missed check, like a late health answer;
                # any other failure is a verdict
                late = (
                    isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                )
                log.warning("worker %s answered health but not Info/GetLoad: %s", w.address, exc)
                answer = None if late else False
        if answer is None and w.healthy:
            # no answer in time: a worker busy on a loaded host stays in rotation until it misses
            # MISSED_CHECKS_OUT checks in a row (NOT_SERVING, a refused connection or a failed
            # request take it out at once)
            w.missed_checks += 1
            if w.missed_checks < MISSED_CHECKS_OUT:
                return
            log.warning("worker %s missed %d health checks in a row", w.address, w.missed_checks)
        w.missed_checks = 0
        healthy = bool(answer)
        if healthy != w.healthy:
            log.info("worker %s %s rotation", w.address, "back in" if healthy else "taken out of")
            if not healthy:  # it may come back restarted, its encoder cache empty
                w.sent_images.clear()
        w.healthy = healthy
        if (
            healthy
            and self.exact
            # tandem's own proto, and OpenEngine's event stream; SMG's proto carries none here
            and isinstance(w.client, WorkerClient | OpenEngineWorkerClient)
            and w.info is not None
            and w.info.kv_events
            and w.address not in self._followers
        ):
            follower = KvEventFollower(self.kv_index, w.address, w.client.kv_events)
            self._followers[w.address] = follower
            follower.start()

    def mark_failed(self, w: WorkerState) -> None:
        """Take a worker out of rotation after a transport failure (the poller brings it back)."""
        if w.healthy:
            log.warning("worker %s failed; taken out of rotation", w.address)
        w.healthy = False
        w.failures += 1
        w.sent_images.clear()

    def adapters(self) -> dict[str, str]:
        """The LoRA adapters some healthy worker serves: name -> content digest."""
        out: dict[str, str] = {}
        for w in self.workers:
            if w.healthy:
                out.update(w.loras)
        return out

    def pick(
        self,
        prompt_token_ids: Sequence[int],
        exclude: Sequence[WorkerState] = (),
        task: str = "generate",
        lora_name: str = "",
    ) -> WorkerState:
        """The worker for a prompt, among those serving `task` ("generate" or "embed", --task; one
        whose Info is not known yet counts as a generate worker) and, under LoRA adapter
        `lora_name`, among those that hold it when any does; raises NoWorkerAvailable when none is
        in rotation."""
        candidates = [
            w
            for w in self.workers
            if w.healthy and w not in exclude and (w.info.task if w.info is not None else "generate") == task
        ]
        if not candidates:
            others = {w.info.task for w in self.workers if w.healthy and w.info is not None} - {task}
            if others:
                raise NoWorkerForTask(
                    f"this gateway's workers run --task {' / '.join(sorted(others))} and serve no "
                    f"{'text generation' if task == 'generate' else 'embeddings'}; that needs workers "
                    f"started with --task {task}"
                )
            raise NoWorkerAvailable("no worker is available")
        if lora_name:
            candidates = [w for w in candidates if lora_name in w.loras] or candidates
        min_load = min(w.load for w in candidates)
        keys = prefix_keys(prompt_token_ids, lora_name)
        digest = next((w.loras[lora_name] for w in candidates if lora_name in w.loras), "")
        chosen = (
            self._pick_exact(prompt_token_ids, candidates, lora_root_hash(digest)) if self.exact else None
        )
        by_address = {w.address: w for w in candidates}
        for key in reversed(keys if chosen is None else []):  # longest shared prefix first
            owner = by_address.get(self._prefix_owner.get(key, ""))
            if owner is not None and owner.load <= min_load + AFFINITY_SLACK:
                chosen = owner
                break
        if chosen is None:
            least = [w for w in candidates if w.load == min_load]
            chosen = least[next(self._round_robin) % len(least)]
        for key in keys:
            self._prefix_owner[key] = chosen.address
            self._prefix_owner.move_to_end(key)
        while len(self._prefix_owner) > PREFIX_TABLE_SIZE:
            self._prefix_owner.popitem(last=False)
        return chosen

    def _pick_exact(
        self, prompt_token_ids: Sequence[int], candidates: list[WorkerState], root: int = ROOT_HASH
    ) -> WorkerState | None:
        """The candidate with the least (prompt blocks it would prefill + LOAD_COST_BLOCKS x load),
        when every candidate's cache is known from its events and one holds part of the prompt;
        None otherwise (the caller guesses by affinity)."""
        caches = [self.kv_index.live(w.address) for w in candidates]
        block_size = caches[0].block_size if caches[0] is not None else 0
        if not block_size or any(c is None or c.block_size != block_size for c in caches):
            return None
        # A worker computes at least the prompt's last token, so at most this many blocks hit.
        max_blocks = max((len(prompt_token_ids) - 1) // block_size, 0)
        hashes = block_hashes(prompt_token_ids, block_size, max_blocks, root)
        hits = [self.kv_index.cached_blocks(w.address, hashes) for w in candidates]
        if not any(hits):
            return None
        costs = [
            len(hashes) - hit + LOAD_COST_BLOCKS * w.load for w, hit in zip(candidates, hits, strict=True)
        ]
        best = min(costs)
        tied = [w for w, cost in zip(candidates, costs, strict=True) if cost == best]
        self.num_exact_routes += 1
        return tied[next(self._round_robin) % len(tied)]

    @contextlib.contextmanager
    def track(self, w: WorkerState):  # type: ignore[no-untyped-def]
        """Count a request as in flight on `w` while the block runs."""
        w.in_flight += 1
        w.sent_since_poll += 1
        w.num_served += 1
        try:
            yield w
        finally:
            w.in_flight -= 1
