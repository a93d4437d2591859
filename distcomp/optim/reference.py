"""A single-process, loop-level restatement of the three algorithms, simulating every rank.

The optimizers fuse state into flat buckets, average through real collectives
and share code between algorithms; this module does none of that. It keeps one
copy of the state per simulated rank and per parameter, writes each algorithm
as a plain loop, and simulates the two-phase 1-bit all-reduce with the sign
codec on the same buckets (which values share a chunk and a scale is part of
the math). Tests run the real optimizers on 2 and 4 processes and compare.

Only what the tests need: fp32 parameters, one parameter group, decoupled
weight decay, ``sqrt(v) + eps``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from distcomp.codecs import SignCodec
from distcomp.collectives import chunk_length
from distcomp.optim import functional as F
from distcomp.optim.adam import OneBitAdam
from distcomp.optim.config import OptimizerConfig
from distcomp.optim.lamb import OneBitLamb
from distcomp.optim.zoadam import ZeroOneAdam

GradFn = Callable[[int, int, list[torch.Tensor]], list[torch.Tensor]]
"""``(rank, step, that rank's parameters) -> that rank's gradients``."""


@dataclass
class Rank:
    """Everything one simulated rank holds, per parameter."""

    params: list[torch.Tensor]
    m: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    werr: list[torch.Tensor] = field(default_factory=list)
    server: dict[int, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("m", "v", "werr"):
            setattr(self, name, [torch.zeros_like(p) for p in self.params])


def two_phase_reference(
    xs: list[torch.Tensor], servers: list[torch.Tensor | None], block: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``(mean, each rank's decoded input, each rank's new server error)`` of flat ``xs`` (one per rank)."""
    codec, w, n = SignCodec(block), len(xs), xs[0].numel()
    c = chunk_length(n, w, block)

    def roundtrip(rows: torch.Tensor) -> torch.Tensor:
        payload = torch.empty(rows.shape[0], codec.payload_bytes(c), dtype=torch.uint8)
        codec.encode(rows, payload)
        return codec.decode(payload, c)

    decoded = [roundtrip(torch.cat([x, x.new_zeros(w * c - n)]).view(w, c)) for x in xs]
    own, new_servers = [], []
    for j in range(w):
        chunk = torch.sum(torch.stack([decoded[r][j] for r in range(w)]), dim=0).div_(w)
        server = servers[j]
        if server is not None:
            chunk.add_(server)
        own.append(roundtrip(chunk.view(1, c)).view(-1))
        new_servers.append(chunk - own[-1])
    return torch.cat(own)[:n], [d.view(-1)[:n] for d in decoded], new_servers


def simulate(
    algorithm: str,
    init: Sequence[torch.Tensor],
    grad_fn: GradFn,
    *,
    world_size: int,
    steps: int,
    buckets: list[list[int]],
    options: dict[str, Any],
) -> list[list[list[torch.Tensor]]]:
    """Parameters of every rank after every step: ``out[step][rank][param]``."""
    opts = _defaults(algorithm) | options
    ranks = [Rank([p.detach().clone().float() for p in init]) for _ in range(world_size)]
    step_fn = {"OneBitAdam": _onebit_adam, "ZeroOneAdam": _zero_one_adam, "OneBitLamb": _onebit_lamb}[algorithm]
    out = []
    for t in range(steps):
        grads = [[g.detach().float() for g in grad_fn(r, t, rk.params)] for r, rk in enumerate(ranks)]
        step_fn(t, ranks, grads, buckets, opts)
        out.append([[p.clone() for p in rk.params] for rk in ranks])
    return out


def _defaults(algorithm: str) -> dict[str, Any]:
    configs: dict[str, type[OptimizerConfig]] = {
        "OneBitAdam": OneBitAdam.Config,
        "ZeroOneAdam": ZeroOneAdam.Config,
        "OneBitLamb": OneBitLamb.Config,
    }
    return dataclasses.asdict(configs[algorithm]())


def _mean(grads: list[list[torch.Tensor]], i: int) -> torch.Tensor:
    """Exact average of parameter ``i``'s gradient, divided first and summed in rank order (as DDP does)."""
    w = len(grads)
    total = grads[0][i] / w
    for r in range(1, w):
        total = total + grads[r][i] / w
    return total


def _compress(
    ranks: list[Rank], values: list[list[torch.Tensor]], buckets: list[list[int]], block: int
) -> list[torch.Tensor]:
    """Per parameter, the 1-bit mean of ``values[rank][param]`` with worker and server error feedback."""
    w = len(ranks)
    if w == 1:
        return list(values[0])
    out: list[torch.Tensor] = [torch.empty(0)] * len(values[0])
    for b, ids in enumerate(buckets):
        xs = [torch.cat([(values[r][i] + ranks[r].werr[i]).reshape(-1) for i in ids]) for r in range(w)]
        servers = [ranks[j].server.get(b) for j in range(w)]
        mean, local, new_servers = two_phase_reference(xs, servers, block)
        for r in range(w):
            ranks[r].server[b] = new_servers[r]
            pos = 0
            for i in ids:
                k = values[r][i].numel()
                ranks[r].werr[i] = (xs[r][pos : pos + k] - local[r][pos : pos + k]).view_as(values[r][i])
                out[i] = mean[pos : pos + k].view_as(values[r][i]).clone()
                pos += k
    return out


def _adam_param(p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, o: dict[str, Any], s: int, v_updates: int) -> None:
    b1, b2 = o["betas"]
    p.mul_(1 - o["lr"] * o["weight_decay"])
    bc1, bc2 = F.bias_correction(b1, s, o["bias_correction"]), F.bias_correction(b2, v_updates, o["bias_correction"])
    p.addcdiv_(m, (v.sqrt() / bc2**0.5).add_(o["eps"]), value=-o["lr"] / bc1)


def _onebit_adam(
    t: int, ranks: list[Rank], grads: list[list[torch.Tensor]], buckets: list[list[int]], o: dict[str, Any]
) -> None:
    b1, b2 = o["betas"]
    n = len(ranks[0].params)
    if t < o["freeze_step"]:
        for i in range(n):
            g = _mean(grads, i)
            for rk in ranks:
                rk.m[i].lerp_(g, 1 - b1)
                rk.v[i].mul_(b2).addcmul_(g, g, value=1 - b2)
                _adam_param(rk.params[i], rk.m[i], rk.v[i], o, t + 1, t + 1)
        return
    local = [[torch.lerp(rk.m[i], grads[r][i], 1 - b1) for i in range(n)] for r, rk in enumerate(ranks)]
    mean = _compress(ranks, local, buckets, o["block"])
    for rk in ranks:
        for i in range(n):
            rk.m[i] = mean[i].clone()
            _adam_param(rk.params[i], rk.m[i], rk.v[i], o, t + 1, o["freeze_step"])


def _zero_one_adam(
    t: int, ranks: list[Rank], grads: list[list[torch.Tensor]], buckets: list[list[int]], o: dict[str, Any]
) -> None:
    b1, b2 = o["betas"]
    n, s, tv, kappa = len(ranks[0].params), t + 1, o["var_freeze_step"], o["var_update_scaler"]
    if t < tv:
        if F.zero_one_variance_step(s, kappa):
            mean = [_mean(grads, i) for i in range(n)]
            for rk in ranks:
                for i in range(n):
                    rk.m[i].lerp_(mean[i], 1 - b1)
                    rk.v[i].mul_(b2).addcmul_(mean[i], mean[i], value=1 - b2)
        else:
            mean = _compress(ranks, grads, buckets, o["block"])
            for rk in ranks:
                for i in range(n):
                    rk.m[i].lerp_(mean[i], 1 - b1)
        for rk in ranks:
            for i in range(n):
                _adam_param(rk.params[i], rk.m[i], rk.v[i], o, s, F.zero_one_variance_updates(s, kappa))
        return
    lr, wd = o["lr"], o["weight_decay"]
    bc1 = F.bias_correction(b1, s, o["bias_correction"])
    bc2 = F.bias_correction(b2, F.zero_one_variance_updates(tv, kappa), o["bias_correction"])
    if t == tv:
        for rk in ranks:
            rk.werr = [torch.zeros_like(p) for p in rk.params]
            rk.server = {}
            rk.extra = {
                "u": [torch.zeros_like(p) for p in rk.params],
                "anchor": [p.clone() for p in rk.params],
                "lrs": [0.0],
                "shrink": [1.0],
            }
    sync = F.zero_one_is_sync(t, tv, o["local_step_scaler"], o["local_step_clipper"])
    local = [[torch.lerp(rk.m[i], grads[r][i], 1 - b1) for i in range(n)] for r, rk in enumerate(ranks)]
    if not sync:
        for r, rk in enumerate(ranks):
            rk.extra["lrs"][0] += lr
            rk.extra["shrink"][0] *= 1 - lr * wd
            for i in range(n):
                rk.m[i] = local[r][i]
                rk.extra["u"][i].add_(rk.m[i], alpha=lr / bc1)
                _adam_param(rk.params[i], rk.m[i], rk.v[i], o, s, F.zero_one_variance_updates(tv, kappa))
        return
    sent = [[torch.add(rk.extra["u"][i], local[r][i], alpha=lr / bc1) for i in range(n)] for r, rk in enumerate(ranks)]
    mean = _compress(ranks, sent, buckets, o["block"])
    for rk in ranks:
        lrs, shrink = rk.extra["lrs"][0] + lr, rk.extra["shrink"][0] * (1 - lr * wd)
        for i in range(n):
            denom = (rk.v[i].sqrt() / bc2**0.5).add_(o["eps"])
            x = rk.extra["anchor"][i].mul(shrink).addcdiv_(mean[i], denom, value=-1.0)
            rk.params[i].copy_(x)
            rk.extra["anchor"][i] = x
            rk.m[i] = mean[i] * (bc1 / lrs)
            rk.extra["u"][i].zero_()
        rk.extra["lrs"][0], rk.extra["shrink"][0] = 0.0, 1.0


def _onebit_lamb(
    t: int, ranks: list[Rank], grads: list[list[torch.Tensor]], buckets: list[list[int]], o: dict[str, Any]
) -> None:
    b1, b2 = o["betas"]
    n, s, fs, wd = len(ranks[0].params), t + 1, o["freeze_step"], o["weight_decay"]
    bc1 = F.bias_correction(b1, s, o["bias_correction"])
    for rk in ranks:
        rk.extra.setdefault("freeze", [0.0] * n)
        rk.extra.setdefault("last", [1.0] * n)
    if t < fs:
        for i in range(n):
            g = _mean(grads, i)
            for rk in ranks:
                rk.m[i].lerp_(g, 1 - b1)
                rk.v[i].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (rk.v[i].sqrt() / F.bias_correction(b2, s, o["bias_correction"]) ** 0.5).add_(o["eps"])
                update = torch.add((rk.m[i] / denom) / bc1, rk.params[i], alpha=wd)
                ratio = F.lamb_trust_ratio(
                    float(rk.params[i].norm()), float(update.norm()), o["min_coeff"], o["max_coeff"]
                )
                if ratio is not None:
                    rk.extra["freeze"][i] = F.ema(rk.extra["freeze"][i], ratio, o["coeff_beta"])
                rk.params[i].add_(update * (1.0 if ratio is None else ratio), alpha=-o["lr"])
                if t == fs - 1:
                    rk.extra.setdefault("fresh", [None] * n)[i] = rk.v[i].clone()
        return
    if t == fs:
        for rk in ranks:
            rk.extra["scale"] = F.momentum_scaling([F.rms(float(m.norm()), m.numel()) for m in rk.m])
    local = [
        [torch.lerp(rk.m[i], grads[r][i], 1 - b1) * rk.extra["scale"][i] for i in range(n)]
        for r, rk in enumerate(ranks)
    ]
    mean = _compress(ranks, local, buckets, o["block"])
    for rk in ranks:
        for i in range(n):
            m_new = mean[i] / rk.extra["scale"][i]
            rebuilt = (m_new - rk.m[i] * b1) / (1 - b1)
            fresh = rk.extra["fresh"][i].mul_(b2).addcmul_(rebuilt, rebuilt, value=1 - b2)
            rk.m[i] = m_new
            denom = (rk.v[i].sqrt() / F.bias_correction(b2, fs, o["bias_correction"]) ** 0.5).add_(o["eps"])
            denom_fresh = (fresh.sqrt() / F.bias_correction(b2, s, o["bias_correction"]) ** 0.5).add_(o["eps"])
            prelim = (m_new / denom) / bc1
            update = torch.add(prelim, rk.params[i], alpha=wd)
            factor = F.lamb_frozen_factor(
                float((denom / denom_fresh).max()),
                float(prelim.norm()),
                float(update.norm()),
                wd,
                rk.extra["last"][i],
                o["factor_min"],
                o["factor_max"],
                o["factor_threshold"],
            )
            rk.extra["last"][i] = factor
            rk.params[i].add_(update * (rk.extra["freeze"][i] * factor), alpha=-o["lr"])
