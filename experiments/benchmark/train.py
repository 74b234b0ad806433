"""Training throughput: the full adversarial step of ``PatchGANTrainer`` fed by the training config's DataLoader."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.benchmark.common import (
    Clock,
    GpuUtilSampler,
    lazy_torch,
    load_config,
    memory_figures,
    prepare_network,
    reset_gpu_peak,
    sync_device,
)


def bench_train(args: argparse.Namespace, items: Sequence[dict[str, Any]], work: Path) -> dict[str, Any]:
    """The adversarial step of ``PatchGANTrainer`` fed by the training config's DataLoader from cached slices.

    Long on purpose, like ``bench_e2e``: the event handlers that start and stop the clocks close over one set of
    counters, and the figures are only checkable when the whole measurement reads in one place.
    """
    torch = lazy_torch()
    from ignite.engine import Events

    device = torch.device(args.device)
    reset_gpu_peak(device)
    cache_dir = Path(args.data_dir) / f"slice_cache_{args.image_size}"
    extra = {
        "train#items": [dict(item) for item in items],
        "cache_dir": str(cache_dir),
        "output_dir": str(work / "train_out"),
        "ckpt_dir": str(work / "train_models"),
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "train#handlers": [],  # no validation, logging or progress bar: the step and the loader only
        "max_epochs": 1_000_000,
    }
    parser = load_config("train.json", args, extra)
    parser.get_parsed_content("initialize")
    with Clock() as cache:
        dataset = parser.get_parsed_content("train#dataset")
    loader = parser.get_parsed_content("train#dataloader")
    if args.batch_size > len(dataset):
        raise SystemExit(f"training batch {args.batch_size} is larger than the {len(dataset)} cached slices: "
                         "add --volumes")
    prepare_network(parser.get_parsed_content("network"), args)
    prepare_network(parser.get_parsed_content("critic"), args)
    trainer = parser.get_parsed_content("train#trainer")
    total = args.warmup + args.iterations
    marks: dict[str, float] = {}
    steps: list[float] = []
    waits: list[float] = []
    state = {"get": 0.0, "last": 0.0}

    def get_started(engine: Any) -> None:
        state["get"] = time.perf_counter()

    def get_completed(engine: Any) -> None:
        if engine.state.iteration >= args.warmup:  # iteration is the count before this batch's step
            waits.append(time.perf_counter() - state["get"])

    def start_timing() -> None:
        sync_device(device)
        marks["start"] = state["last"] = time.perf_counter()
        util.start()

    def iteration_completed(engine: Any) -> None:
        if engine.state.iteration == args.warmup:
            start_timing()
            return
        if engine.state.iteration > args.warmup:
            now = time.perf_counter()
            steps.append(now - state["last"])
            state["last"] = now
        if engine.state.iteration >= total:
            sync_device(device)
            marks["end"] = time.perf_counter()
            engine.terminate()

    util = GpuUtilSampler(device)
    trainer.add_event_handler(Events.GET_BATCH_STARTED, get_started)
    trainer.add_event_handler(Events.GET_BATCH_COMPLETED, get_completed)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, iteration_completed)
    if not args.warmup:
        trainer.add_event_handler(Events.STARTED, lambda engine: start_timing())
    with Clock(device) as run:
        trainer.run()
    gpu_util = util.stop()
    elapsed = marks["end"] - marks["start"]
    images = args.iterations * args.batch_size
    del trainer, loader
    import gc

    gc.collect()
    return {
        "what": "PatchGANTrainer iteration (R forward, D update, R update with reconstruction + adversarial loss) "
                "fed by the training config's DataLoader (slice cache -> RandBoxMaskd)",
        "batch_size": args.batch_size,
        "iterations": args.iterations,
        "warmup": args.warmup,
        "workers": args.workers,
        "amp_bf16": bool(trainer_amp(parser) and device.type == "cuda"),
        "cached_slices": len(dataset),
        "cache_build_s": round(cache.wall, 3),
        "images_per_s": round(images / elapsed, 3),
        "step_ms_median": round(1000 * statistics.median(steps), 2) if steps else None,
        "timed_s": round(elapsed, 3),
        "run_s_incl_warmup": round(run.wall, 3),
        "data_wait_fraction": round(sum(waits) / elapsed, 4) if elapsed else None,
        "gpu_utilization_percent": gpu_util,
        **memory_figures(device),
    }


def trainer_amp(parser: Any) -> bool:
    return bool(parser.get_parsed_content("amp"))
