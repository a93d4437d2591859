"""Predict a method's step time on a network you do not have: an alpha-beta model of each collective, the
buckets' communication overlapped with backward, the payload from the compressor's own dry run on the
model's shapes and its encode/decode cost measured on this machine.

The model of one step (all times per rank):

* ``compute``: forward + backward + optimizer without communication (measured: the no-communication
  bound, or given); backward is ``backward_fraction`` of it.
* ``codec``: the compressor's encode/decode (:mod:`distcomp.bench.traffic`), on the same device as the
  compute, so it lengthens the step; backward and codec fill the buckets in DDP's order.
* Each collective of ``n`` bytes on ``p`` ranks (ring algorithms; latency ``a`` per message, goodput
  ``B`` bytes/s per host): all-reduce ``2 (p-1) a + 2 (p-1)/p n/B``; all-gather (``n`` from each rank)
  ``(p-1) a + (p-1) n/B``; all-to-all and reduce-scatter ``(p-1) a + (p-1)/p n/B``.
* Overlap: a bucket's collectives start when its gradients are ready and the previous bucket's are done
  (one link, first in first out); what is still on the wire when backward ends is exposed. A method that
  does not overlap (one bucket, or ``overlap=False``) exposes all of it. FSDP2 overlaps its units'
  collectives with forward and backward on CUDA streams; on CPU it runs them in line, exposing all.

``step = compute + codec + exposed``. The compressed optimizers are predicted as the sign exchange of
their momentum (what they send in their compressed phase).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from distcomp.bench.methods import Method
from distcomp.bench.traffic import Collective, Shape, Traffic, compressed_traffic, dense_traffic, fsdp_traffic

GOODPUT = 0.92
"""What a TCP stream carries of a link's line rate (headers, acknowledgements, the shaper's queue): the
default of :attr:`Network.efficiency`, from the probes of the committed benchmark run (0.84 to 0.96)."""
OPTIMIZER_EXCHANGE = "sign"
"""What the compressed optimizers are predicted as: the 1-bit exchange of their momentum."""
BACKWARD_FRACTION = 0.6
"""Backward's share of a step's compute, when not measured."""
TORCH_POWERSGD_CAP_MB = 1024.0
"""torch's ``powerSGD_hook`` is predicted on one bucket, as the benchmark runs it."""


@dataclass(frozen=True, kw_only=True)
class Network:
    """A host's link: line rate, latency per message, and the share of the rate a TCP stream gets."""

    bandwidth_bits: float
    """Each host's egress, bits per second."""
    latency_s: float = 50e-6
    """Latency of one message (alpha)."""
    efficiency: float = GOODPUT
    """Goodput over line rate."""

    def seconds(self, c: Collective, world: int) -> float:
        """Time of collective ``c`` on ``world`` ranks."""
        p, a, rate = world, self.latency_s, self.bandwidth_bits * self.efficiency / 8
        if p < 2:
            return 0.0
        if c.op == "all_reduce":
            return 2 * (p - 1) * a + 2 * (p - 1) / p * c.nbytes / rate
        if c.op == "all_gather":
            return (p - 1) * a + (p - 1) * c.nbytes / rate
        return (p - 1) * a + (p - 1) / p * c.nbytes / rate

    def sent_bytes(self, c: Collective, world: int) -> float:
        """Bytes one rank puts on the wire for ``c``."""
        p = world
        factor = {"all_reduce": 2 * (p - 1) / p, "all_gather": p - 1}.get(c.op, (p - 1) / p)
        return factor * c.nbytes


@dataclass(frozen=True, kw_only=True)
class Workload:
    """The model and the device it trains on."""

    shapes: tuple[Shape, ...]
    compute_s: float
    """Forward + backward + optimizer of one rank's batch, without communication."""
    backward_fraction: float = BACKWARD_FRACTION
    bucket_cap_mb: float = 25.0
    """DDP's bucket size (its default is 25)."""
    device: str = "cpu"
    codec_scale: float = 1.0
    """Factor on the codec time measured here: e.g. 2 when two ranks share each core the codec ran on."""


@dataclass(frozen=True)
class Prediction:
    """One method on one network and world size."""

    method: str
    world: int
    step_s: float
    comm_s: float
    """Time on the wire, exposed or not."""
    exposed_s: float
    codec_s: float
    sent_mb: float


def step_time(method: str, traffic: Traffic | None, wl: Workload, net: Network, world: int) -> Prediction:
    """The predicted step of ``method`` whose step sends ``traffic`` (None: nothing, the bound)."""
    if traffic is None or world < 2:
        return Prediction(method, world, wl.compute_s, 0.0, 0.0, 0.0, 0.0)
    codec = traffic.codec_s * wl.codec_scale
    if traffic.sharded:
        return _sharded_step(method, traffic, wl, net, world, codec)
    backward = wl.compute_s * wl.backward_fraction + codec
    total, done, end, comm, sent = traffic.numel or 1, 0, 0.0, 0.0, 0.0
    for b in traffic.buckets:
        done += b.numel
        ready = backward * done / total if traffic.overlap else backward
        seconds = sum(net.seconds(c, world) for c in b.collectives)
        sent += sum(net.sent_bytes(c, world) for c in b.collectives)
        end, comm = max(ready, end) + seconds, comm + seconds
    exposed = max(end - backward, 0.0)
    return Prediction(method, world, wl.compute_s + codec + exposed, comm, exposed, codec, sent / 1e6)


def _sharded_step(method: str, traffic: Traffic, wl: Workload, net: Network, world: int, codec: float) -> Prediction:
    """FSDP: the units' all-gathers and reductions overlap forward and backward; the first unit's all-gather
    (before any compute) and the last unit's reduction (after it) cannot."""
    per_bucket = [[net.seconds(c, world) for c in b.collectives] for b in traffic.buckets]
    comm = sum(map(sum, per_bucket))
    edges = per_bucket[0][0] + per_bucket[-1][-1]
    exposed = max(comm - wl.compute_s - codec, edges) if traffic.overlap else comm
    sent = sum(net.sent_bytes(c, world) for b in traffic.buckets for c in b.collectives)
    return Prediction(method, world, wl.compute_s + codec + exposed, comm, exposed, codec, sent / 1e6)


# -- each method's traffic -----------------------------------------------------------------


def method_traffic(method: Method, wl: Workload, world: int, reps: int = 3) -> Traffic | None:
    """What ``method`` sends per step on ``world`` ranks (None for the bound, which sends nothing)."""
    options = dict(method.options)
    if method.kind == "noop":
        return None
    if method.kind == "ddp":
        return dense_traffic(wl.shapes, wl.bucket_cap_mb)
    if method.kind == "fsdp":
        return fsdp_traffic(
            method.compressor, wl.shapes, world, bucket_cap_mb=wl.bucket_cap_mb, device=wl.device, reps=reps
        )
    cap, compressor = wl.bucket_cap_mb, str(method.compressor)
    if method.kind == "torch_powersgd":
        cap, compressor = TORCH_POWERSGD_CAP_MB, "powersgd"
    elif method.kind == "optimizer":
        compressor, options = OPTIMIZER_EXCHANGE, {}
    return compressed_traffic(compressor, options, wl.shapes, world, bucket_cap_mb=cap, device=wl.device, reps=reps)


@dataclass
class Forecast:
    """Predictions for every method, network and world size, with what the dry runs warned about."""

    predictions: dict[tuple[str, float, int], Prediction]
    """``{(method, bandwidth bits, world): prediction}``."""
    notes: dict[str, list[str]]
    """``{method: warnings of its dry runs}`` (e.g. top-k averaging buckets exactly at large world sizes)."""

    def get(self, method: str, net: Network, world: int) -> Prediction:
        return self.predictions[(method, net.bandwidth_bits, world)]


def predict(
    methods: Sequence[Method], wl: Workload, nets: Sequence[Network], worlds: Sequence[int], reps: int = 3
) -> Forecast:
    """Every combination of method, network and world size (one dry run per method and world size, shared by
    the networks)."""
    out = Forecast({}, {})
    for m in methods:
        for w in worlds:
            traffic = method_traffic(m, wl, w, reps)
            if traffic is not None and traffic.notes:
                out.notes.setdefault(m.name, []).extend(f"{w} ranks: {n}" for n in traffic.notes)
            for net in nets:
                out.predictions[(m.name, net.bandwidth_bits, w)] = step_time(m.name, traffic, wl, net, w)
    return out
