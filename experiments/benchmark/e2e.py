"""End-to-end inference speed over volume files, each stage timed: read, normalise, network, writing, waiting for data."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

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
from experiments.benchmark.data import phantom_slices, write_datalist
from scripts.config import uses_bf16


class TimedTransform:
    """Wraps one preprocessing transform; adds its wall seconds to ``data['bench_<name>_s']`` (in the worker)."""

    def __init__(self, name: str, transform: Callable) -> None:
        self.name, self.transform = name, transform

    def __call__(self, data: Any) -> Any:
        start = time.perf_counter()
        out = self.transform(data)
        if isinstance(out, dict):
            out[f"bench_{self.name}_s"] = time.perf_counter() - start
        return out


STAGE_NAMES = {"LoadCased": "read", "BrainPercentileNormalized": "normalise", "EnsureTyped": "to_tensor"}


class StageTimer:
    """Per-stage seconds of an ignite run: data waits, wrapped calls (inferer, writer), worker-side transform times."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.totals: dict[str, float] = {}
        self.per_item: dict[str, list[float]] = {}
        self._batch_start = 0.0

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds
        self.per_item.setdefault(name, []).append(seconds)

    def wrap(self, name: str, fn: Callable, sync: bool = False) -> Callable:
        def timed(*a: Any, **k: Any) -> Any:
            if sync:
                sync_device(self.device)
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if sync:
                    sync_device(self.device)
                self.add(name, time.perf_counter() - start)

        return timed

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.GET_BATCH_STARTED, self._get_started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._get_completed)

    def _get_started(self, engine: Any) -> None:
        self._batch_start = time.perf_counter()

    def _get_completed(self, engine: Any) -> None:
        self.add("data_wait", time.perf_counter() - self._batch_start)
        batch = engine.state.batch
        if isinstance(batch, dict):
            for key, value in batch.items():
                if isinstance(key, str) and key.startswith("bench_") and key.endswith("_s"):
                    for seconds in np.atleast_1d(np.asarray(value, dtype=np.float64)).tolist():
                        self.add(key[len("bench_"):-2], seconds)


def bench_e2e(args: argparse.Namespace, items: Sequence[dict[str, Any]], work: Path) -> dict[str, Any]:
    """End-to-end inference through the inference config over ``items`` (volumes), stage by stage.

    Long on purpose: set-up, warm-up, the timed run and the per-stage arithmetic share the clocks and counters of
    one measurement, and reading them in one place is what makes the figures checkable.
    """
    torch = lazy_torch()
    from scripts.outputs.writer import AnomalyScoreWriter

    device = torch.device(args.device)
    reset_gpu_peak(device)
    setup = Clock()
    with setup:
        datalist = write_datalist(work / "e2e_datalist.json", items, "testing", keep_seg=False)
        extra = {"datalist": str(datalist), "output_dir": str(work / "e2e_out"), "num_workers": args.workers,
                 "ckpt_path": str(work / "e2e_model.pt"), "test_input": args.test_input}
        if args.slice_batch_size:
            extra["slice_batch_size"] = args.slice_batch_size
        from scripts.scoring.calibration import RESIDUAL_BINS, neutral_residual_calibration

        parser = load_config("inference.json", args, extra)
        network = parser.get_parsed_content("network")
        torch.save(network.state_dict(), work / "e2e_model.pt")  # random weights: speed does not depend on them
        torch.save(neutral_residual_calibration(bins=RESIDUAL_BINS), work / "residual_calibration.pt")  # as trained
        prepare_network(network, args)
        parser.get_parsed_content("initialize")
        timer = StageTimer(device)
        dataset = parser.get_parsed_content("dataset")
        dataset.transform.transforms = tuple(
            TimedTransform(STAGE_NAMES.get(type(t).__name__, type(t).__name__), t) for t in dataset.transform.transforms
        )
        inferer = parser.get_parsed_content("inferer")
        inferer.score = timer.wrap("network", inferer.score, sync=True)
        writers = [h for h in parser.get_parsed_content("handlers") if isinstance(h, AnomalyScoreWriter)]
        for writer in writers:
            writer._collect = timer.wrap("write", writer._collect)
            writer._overlay_volume = timer.wrap("write_overlay", writer._overlay_volume)
            writer._write = timer.wrap("write_csv", writer._write)
        evaluator = parser.get_parsed_content("evaluator")
        timer.attach(evaluator)
    warm = Clock(device)
    if args.warmup:
        with warm:  # first-call costs (CUDA context, cuDNN plans, compilation) kept out of the throughput
            probe = phantom_slices(args.image_size, 1).to(device)
            type(inferer).score(inferer, probe, evaluator.network)  # the class method: not counted as a stage
    slices_seen: list[int] = []
    scored: list[int] = []

    def count(engine: Any) -> None:
        out = engine.state.output
        if isinstance(out, dict) and "scores" in out:
            slices_seen.append(int(out["scores"].slice_scores.numel()))
            scored.append(int(out["scores"].slice_valid.sum()))

    from ignite.engine import Events

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, count)
    util = GpuUtilSampler(device)
    util.start()
    with Clock(device) as run:
        evaluator.run()
    gpu_util = util.stop()
    n = len(scored)
    errors = (work / "e2e_out" / "errors.csv").read_text().strip().splitlines()[1:]
    per_volume = {k: round(v / max(n, 1), 4) for k, v in sorted(timer.totals.items())}
    read_stages = [s for s in ("read", "normalise", "to_tensor") if s in per_volume]
    read_s = sum(per_volume[s] for s in read_stages)
    net_s, write_s = per_volume.get("network", 0.0), per_volume.get("write", 0.0) + per_volume.get("write_csv", 0.0)
    # throughput each stage could sustain on its own: workers read in parallel, the main process scores and writes
    capacity = {
        "read_normalise": (max(args.workers, 1) / read_s) if read_s else math.inf,
        "network": (1 / net_s) if net_s else math.inf,
        "write": (1 / write_s) if write_s else math.inf,
        "main_process_network_plus_write": (1 / (net_s + write_s)) if net_s + write_s else math.inf,
    }
    stage_caps = {k: v for k, v in capacity.items() if k != "main_process_network_plus_write"}
    bottleneck = min(stage_caps, key=stage_caps.get)
    return {
        "what": "inference config: DataLoader(read, normalise) -> AnomalyScorer(PatchRankingInferer) -> "
                "AnomalyScoreWriter(scores.csv, slice_scores.csv, heatmap .nii.gz, overlay .png)",
        "volumes": n,
        "failed": len(errors),
        "volume_shape": list(args.volume_shape) if args.generated else "from --data-dir",
        "data_dir": args.data_dir,
        "test_input": args.test_input,
        "workers": args.workers,
        "slice_batch_size": inferer.batch_size(torch.empty(0, device=device)),
        "amp_bf16": uses_bf16(inferer.amp, device),
        "wall_s": round(run.wall, 3),
        "process_cpu_s": round(run.cpu, 3),
        "setup_s": round(setup.wall, 3),
        "warmup_s": round(warm.wall, 3),
        "volumes_per_s": round(n / run.wall, 4),
        "slices_per_s": round(sum(slices_seen) / run.wall, 2),
        "scored_slices_per_s": round(sum(scored) / run.wall, 2),
        "slices_per_volume": round(sum(slices_seen) / max(n, 1), 1),
        "scored_slices_per_volume": round(sum(scored) / max(n, 1), 1),
        "stage_s_per_volume": per_volume,
        "read_normalise_s_per_volume": round(read_s, 4),
        "stage_capacity_volumes_per_s": {k: (round(v, 3) if math.isfinite(v) else None) for k, v in capacity.items()},
        "bottleneck": bottleneck,
        "gpu_utilization_percent": gpu_util,
        **memory_figures(device),
    }
