"""CUDA streams for work handed from the autograd thread to a communication worker.

A worker thread's current CUDA stream is the device's default stream, so
without care its decode kernels would queue behind (or race with) the
backward pass that produced the gradients. A job handed to a worker
therefore:

1. records an event on the submitting thread's current stream (the stream
   the gradients were produced on) and makes the worker's own stream wait
   for it, so the worker never reads a gradient before it is written;
2. marks the handed tensor as used on the worker's stream
   (``record_stream``), so the caching allocator cannot reuse its memory
   while the worker still works on it;
3. completes a ``torch.futures.Future`` built with the tensor's device, while
   the worker's stream is current: the future records an event there, and
   whoever waits on it (DDP's reducer) makes its own stream wait for that
   event and records the result's memory as used on its stream.

On the CPU every step is a no-op and a future carries no device, so the CPU
path is exactly what it was.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch


def devices_of(tensor: torch.Tensor | None) -> list[int | str | torch.device]:
    """The devices a future holding ``tensor`` must synchronize: its CUDA device, or none."""
    return [tensor.device] if tensor is not None and tensor.is_cuda else []


def new_future(tensor: torch.Tensor | None) -> torch.futures.Future:
    """A future for a result on ``tensor``'s device (a future without devices would skip the stream sync)."""
    return torch.futures.Future(devices=devices_of(tensor))


class WorkerStreams:
    """One CUDA stream per device for one worker, made on first use."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._lock = threading.Lock()

    def get(self, device: torch.device) -> torch.cuda.Stream:
        """The worker's stream on ``device``."""
        with self._lock:
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device)
            return stream


class Handoff:
    """A job's hand-over from the submitting thread to a worker: made at submit, entered on the worker.

    ``tensor`` is the data the job reads (a DDP bucket's buffer); None or a CPU
    tensor makes the hand-over a no-op.
    """

    def __init__(self, tensor: torch.Tensor | None) -> None:
        self._tensor = tensor if tensor is not None and tensor.is_cuda else None
        self._ready: torch.cuda.Event | None = None
        if self._tensor is not None:
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(self._tensor.device))

    @contextlib.contextmanager
    def on_worker(self, streams: WorkerStreams) -> Iterator[None]:
        """Run the body on the worker's stream, after the work queued before the submit."""
        if self._tensor is None or self._ready is None:
            yield
            return
        device = self._tensor.device
        stream = streams.get(device)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            stream.wait_event(self._ready)
            self._tensor.record_stream(stream)
            yield
