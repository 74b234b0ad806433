"""Model-only inference speed: ``PatchRankingInferer.score`` on slices already on the device, and the fast path checked against the plain one."""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from typing import Any

from experiments.benchmark.common import (
    Clock,
    lazy_torch,
    load_config,
    memory_figures,
    prepare_network,
    reset_gpu_peak,
)
from experiments.benchmark.data import phantom_slices
from scripts.config import uses_bf16


def compare_paths(network: Any, plain_network: Any, inferer_kwargs: dict[str, Any], slices: Any,
                  device: Any, amp: bool, slice_batch_size: int) -> dict[str, Any]:
    """Scores of the fast path (batched slices, ``amp``, the prepared ``network``) against the plain per-slice fp32
    path (``slice_batch_size=1``, no amp, ``plain_network``) on the same slices, as a volume ``(1, 1, S, S, n)``."""
    torch = lazy_torch()
    from scripts.config import uses_bf16
    from scripts.scoring.inferer import PatchRankingInferer

    volume = slices.permute(1, 2, 3, 0).unsqueeze(0).to(device)
    fast = PatchRankingInferer(**{**inferer_kwargs, "slice_batch_size": slice_batch_size, "amp": amp})
    plain = PatchRankingInferer(**{**inferer_kwargs, "slice_batch_size": 1, "amp": False})
    a, b = fast.score(volume, network), plain.score(volume, plain_network)
    valid = b.slice_valid
    rel = lambda x, y: float(((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).cpu())  # noqa: E731
    bf16 = uses_bf16(amp, device)
    tolerance = 5e-2 if bf16 else 1e-4
    out = {
        "slices": int(len(slices)),
        "scored_slices": int(valid.sum()),
        "fast_path": {"slice_batch_size": slice_batch_size, "bf16": bf16},
        "plain_path": {"slice_batch_size": 1, "bf16": False},
        "slice_scores_max_rel_diff": rel(a.slice_scores[valid], b.slice_scores[valid]),
        "heatmap_max_rel_diff": rel(a.heatmap, b.heatmap),
        "case_score_rel_diff": rel(a.case_scores, b.case_scores),
        "same_valid_slices": bool(torch.equal(a.slice_valid.cpu(), valid.cpu())),
        "tolerance_rel": tolerance,
    }
    out["within_tolerance"] = bool(
        out["same_valid_slices"]
        and max(out["slice_scores_max_rel_diff"], out["heatmap_max_rel_diff"], out["case_score_rel_diff"]) <= tolerance
    )
    return out


def _time_calls(fn: Callable[[], Any], device: Any, warmup: int, iterations: int) -> tuple[list[float], float]:
    """Per-call wall seconds of ``iterations`` calls after ``warmup``; also the first call's seconds."""
    first = None
    for _ in range(max(warmup, 1)):
        with Clock(device) as clock:
            fn()
        first = clock.wall if first is None else first
    times = []
    for _ in range(iterations):
        with Clock(device) as clock:
            fn()
        times.append(clock.wall)
    return times, float(first)


def bench_model(args: argparse.Namespace) -> dict[str, Any]:
    """Model-only inference: ``PatchRankingInferer.score`` on slices already on the device."""
    torch = lazy_torch()
    device = torch.device(args.device)
    reset_gpu_peak(device)
    from scripts.scoring.calibration import RESIDUAL_BINS, neutral_residual_calibration

    parser = load_config("inference.json", args)
    network = parser.get_parsed_content("network").eval()
    base = parser.get_parsed_content("inferer")
    kwargs = {
        "image_size": base.image_size, "patch_size": base.patch_size, "ranking_weights": base.weights or (1.1, 1.0),
        "ranking": base.weights is not None, "inpaint_stride": base.inpaint_stride,
        "min_brain_fraction": base.min_brain_fraction, "foreground": base.foreground,
        "volume_aggregation": base.volume_aggregation, "top_k_slices": base.top_k_slices,
        # random weights have no calibration of their own; the lookup costs the same whatever the table's numbers
        "residual_calibration": neutral_residual_calibration(bins=RESIDUAL_BINS) if base.residual_calibration else None,
    }
    plain_network = None
    if args.check_slices:
        plain_network = parser.get_parsed_content("network_def").to(device).eval()
        plain_network.load_state_dict(network.state_dict())
    prepare_network(network, args)
    run_network = network
    out: dict[str, Any] = {
        "what": "PatchRankingInferer.score on resized slices on the device (reconstruct, patch errors, ranking, heatmap)",
        "image_size": args.image_size,
        "parameters": sum(p.numel() for p in network.parameters()),
        "amp_bf16": uses_bf16(base.amp, device),
    }
    from scripts.scoring.inferer import PatchRankingInferer

    for test_input in ("inpaint", "image"):
        passes = base.inpaint_stride**2 if test_input == "inpaint" else 1
        figures: dict[str, Any] = {"network_passes_per_slice": passes}
        for batch in (1, args.infer_batch_size):
            sbs = args.slice_batch_size or (min(passes * batch, 512) if device.type == "cuda" else base.batch_size(torch.empty(0, device=device)))
            inferer = PatchRankingInferer(**kwargs, test_input=test_input, slice_batch_size=sbs, amp=base.amp)
            images = (torch.rand(batch, 1, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
                      * 0.9 + 0.05).to(device)
            times, first = _time_calls(lambda: inferer.score(images, run_network), device, args.warmup, args.iterations)
            median = statistics.median(times)
            figures[f"batch_{batch}"] = {
                "batch": batch, "slice_batch_size": sbs, "calls": len(times),
                "latency_ms_median": round(1000 * median, 2), "latency_ms_min": round(1000 * min(times), 2),
                "slices_per_s": round(batch * len(times) / sum(times), 2),
                "first_call_s": round(first, 3),
            }
            print(f"benchmark: model {test_input} batch {batch}: {figures[f'batch_{batch}']['slices_per_s']} slices/s",
                  file=sys.stderr)
        out[test_input] = figures
    if args.check_slices:
        slices = phantom_slices(args.image_size, args.check_slices)
        out["consistency"] = compare_paths(run_network, plain_network, {**kwargs, "test_input": base.test_input},
                                           slices, device, base.amp, args.slice_batch_size or 32)
    out.update(memory_figures(device))
    return out
