"""What one worker's encoder cache holds, as this gateway saw it: the images it sent the worker
with pixels (or an encode worker's rows), so that a later request sends them as their hash alone.

The worker keeps image embeddings by content hash, least recently used out past its
`WorkerInfo.encoder_cache_size` (services/worker/mm_inputs.py `EncoderCache`). This is the
sender's half of that cache (as vLLM's multimodal processor cache mirrors the engine core's): an
LRU of the same size, which adds an image when the worker has admitted a request that carried it
(its first chunk came) and touches it whenever a request names it, in the order the worker does.
vLLM's two halves stay exactly in step (one ordered channel between one sender and one
receiver); here they can part (requests of other gateways or straight over gRPC, concurrent
streams, an aborted request whose image was never encoded, a worker that restarted), so a miss is
an answer rather than an assertion: a hash-only image the worker does not hold comes back as
FAILED_PRECONDITION, the gateway forgets everything it remembered for that worker and resends
the request once with the pixels (gateway/worker_stream.py).

Keys are the styler's pixel hashes; values the hash the worker knows the image by: the same one,
or, with encode workers, the hash of the rows the worker was sent (so a remembered image skips
the encode worker too).
"""

from __future__ import annotations

from collections import OrderedDict


class SentImages:
    """Images a worker holds as far as this gateway knows; `capacity` 0: send pixels always."""

    def __init__(self) -> None:
        self.capacity = 0  # the worker's encoder_cache_size (Info), set at each poll
        self._hashes: OrderedDict[str, str] = OrderedDict()

    def lookup(self, pixel_hash: str) -> str | None:
        """The hash the worker knows this image by, or None: send it whole."""
        worker_hash = self._hashes.get(pixel_hash)
        if worker_hash is not None:
            self._hashes.move_to_end(pixel_hash)
        return worker_hash

    def add(self, pixel_hash: str, worker_hash: str) -> None:
        """The worker admitted a request that carried this image whole."""
        if self.capacity <= 0:
            return
        self._hashes[pixel_hash] = worker_hash
        self._hashes.move_to_end(pixel_hash)
        while len(self._hashes) > self.capacity:
            self._hashes.popitem(last=False)

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        while len(self._hashes) > max(capacity, 0):
            self._hashes.popitem(last=False)

    def clear(self) -> None:
        """The worker did not hold an image we thought it did: it restarted, or others' images
        evicted ours. Start over (each image is sent whole once more)."""
        self._hashes.clear()

    def __len__(self) -> int:
        return len(self._hashes)
