"""The job on one rank: every run the config asks for, then the summary on rank 0."""

from __future__ import annotations

import logging
from pathlib import Path

from distcomp.train import forecast
from distcomp.train.config import TrainConfig, config_to_raw
from distcomp.train.data import load_corpus
from distcomp.train.loop import RankContext, train_run
from distcomp.train.stop import exit_code
from distcomp.train.telemetry import RunResult, format_table, write_summary

logger = logging.getLogger("distcomp.train")


def rank_job(cfg: TrainConfig, ctx: RankContext, resume: Path | None) -> int:
    """Run ``cfg.runs()`` one after another; 0 when done, 128 + the signal when stopped by one (130 for Ctrl-C)."""
    corpus = load_corpus(cfg.data, cfg.model.context)
    root = Path(cfg.log.dir) / cfg.name
    if ctx.rank == 0:
        logger.info(
            "distcomp train %s: %d ranks (%s on %s), data: %s, runs: %s",
            cfg.name,
            ctx.world_size,
            ctx.backend,
            ctx.device.type,
            corpus.source,
            ", ".join(r.name for r in cfg.runs()),
        )
    results: list[RunResult] = []
    stopped = 0
    for spec in cfg.runs():
        result, stopped = train_run(cfg, spec, ctx, corpus, run_dir=root / spec.name, resume=resume, show=ctx.rank == 0)
        if result is not None:
            results.append(result)
        if stopped:
            break
    if ctx.rank == 0:
        header = (
            f"distcomp train {cfg.name}: {ctx.world_size} ranks ({ctx.backend}, {ctx.device.type}), "
            f"GPT {results[0].params / 1e6:.1f}M parameters, batch {cfg.data.batch_size} x "
            f"{cfg.model.context} bytes per rank, {corpus.source}"
        )
        predicted = forecast.safe_rows(cfg, results, ctx.world_size, ctx.device.type)
        table = format_table(results, header, predicted, forecast.footnote(ctx.world_size))
        # The file first: after SIGHUP the terminal may be gone and printing fail.
        summary = {"runs": [r.as_dict() for r in results], "table": table, "config": config_to_raw(cfg)}
        write_summary(root / "summary.json", summary)
        print("\n" + table + "\n", flush=True)
        logger.info("summary written to %s; TensorBoard: tensorboard --logdir %s", root / "summary.json", cfg.log.dir)
    return exit_code(stopped) if stopped else 0
