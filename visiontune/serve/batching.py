"""Concurrent requests share one forward pass: what keeps a served model fast on a GPU.

One image per forward leaves a GPU almost idle (launch overhead dominates lite0 at batch 1), and on a CPU
a batch amortises the engine's per-call cost too. :class:`ForwardBatcher` lets the first request of a burst
wait `window_s` (a few milliseconds) for others, then runs all images that arrived in one forward and hands
each request its rows. Forwards run one at a time; requests that arrive during one are the next batch, so
under load the batch grows by itself and a lone request pays at most the window.

Threads, not asyncio: the server runs each request's decoding and prediction in a worker thread
(`asyncio.to_thread`), and the forward releases the GIL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

#: How long the first request of a burst waits for others: well under a network round trip.
WINDOW_S = 0.003


@dataclass
class _Job:
    images: torch.Tensor
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None


class ForwardBatcher:
    """`batcher(images) -> rows` like `run(images)`, but images of requests arriving within `window_s` of the
    first go through `run` together (at most `max_images` at once)."""

    def __init__(self, run: Callable[[torch.Tensor], np.ndarray], window_s: float = WINDOW_S, max_images: int = 256):
        self.run, self.window_s, self.max_images = run, window_s, max_images
        self._lock = threading.Lock()  # guards the queue
        self._forward = threading.Lock()  # one forward at a time
        self._pending: list[_Job] = []
        self._leader = False  # a thread is collecting the next batch
        self.batches: list[int] = []  # requests per forward (the server's /metrics-style record, and tests)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        job = _Job(images)
        with self._lock:
            self._pending.append(job)
            lead = not self._leader
            self._leader = self._leader or lead
        if lead:
            self._lead()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _queued_images(self) -> int:
        with self._lock:
            return sum(len(j.images) for j in self._pending)

    def _lead(self) -> None:
        """Wait out the window (or until the batch is full), then run every queued job in one forward."""
        deadline = time.perf_counter() + self.window_s
        while time.perf_counter() < deadline and self._queued_images() < self.max_images:
            time.sleep(self.window_s / 10)
        with self._forward:  # jobs queued while the previous forward ran join this one
            with self._lock:
                jobs, self._pending, self._leader = self._pending, [], False
            self.batches.append(len(jobs))
            try:
                rows = self.run(torch.cat([j.images for j in jobs]))
            except BaseException as error:  # noqa: BLE001 - every waiting request gets the error
                for j in jobs:
                    j.error = error
                    j.done.set()
                return
            start = 0
            for j in jobs:
                j.result = rows[start : start + len(j.images)]
                start += len(j.images)
                j.done.set()
