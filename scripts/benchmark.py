"""Speed and memory benchmark of the bundle on the current device: ``python -m scripts.benchmark``.

Everything is built from the bundle's own configs (``configs/inference.json``, ``configs/train.json``) through
MONAI's ``ConfigParser``, with overrides for device, sizes and paths, so the figures are those of the code a user
runs. Three sections, each timed on its own:

- ``model``: model-only inference, ``PatchRankingInferer.score`` (reconstruction, patch errors, ranking, heatmap)
  on resized slices already on the device: latency at batch 1 and throughput at a large batch, for the default
  in-painting test input (``inpaint_stride**2`` network passes) and for ``test_input: image`` (one pass).
  It also checks that the fast path (batched slices, and bf16 / channels_last / compile when asked for) gives the
  scores of the plain per-slice fp32 path.
- ``e2e``: end-to-end inference over a folder of BraTS-size FLAIR volumes (240x240x155 ``.nii.gz``, generated with
  ``scripts.synthetic`` when no ``--data-dir`` is given): the inference config's DataLoader, ``AnomalyEvaluator``
  and ``AnomalyScoreWriter``, from reading the files to the written scores, heatmaps and overlays. Stages are
  timed separately (read, normalise, network, writing, waiting for data) and the slowest is named.
- ``train``: the full adversarial step of ``PatchGANTrainer`` (D update, R update) fed by the training config's
  DataLoader from the slice cache, images/s after ``--warmup`` iterations.

Each section reports its peak host memory (``resource.getrusage``; the section runs in its own process unless
``--no-isolate``) and, on CUDA, its peak GPU memory (``torch.cuda.max_memory_allocated``).

The JSON goes to stdout (and ``--json PATH``), a short table to stderr::

    python -m scripts.benchmark                                  # everything, default sizes
    python -m scripts.benchmark --only e2e --volumes 1           # one BraTS-size volume end to end
    python -m scripts.benchmark --device cuda --amp --compile --workers 16 --volumes 64
    python -m scripts.benchmark --quick                          # tiny sizes: a smoke test in seconds
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("model", "e2e", "train")
BRATS_SHAPE = (240, 240, 155)

# --quick: the tiny sizes of the bundle's own tests (image 32, patch 8, a three-level UNet)
QUICK = {
    "image_size": 32,
    "patch_size": 8,
    "volume_shape": (48, 48, 16),
    "volumes": 2,
    "iterations": 2,
    "warmup": 1,
    "batch_size": 4,
    "infer_batch_size": 8,
    "check_slices": 4,
    "set": [
        "network_def#channels=[8, 16, 32]",
        "network_def#strides=[2, 2]",
        "network_def#num_res_units=1",
        "discriminator_def#channels=8",
    ],
}

# reference figures of the issue (H100, 256x256, bf16, default network sizes; the CPU one on 2 cores)
TARGETS = {
    "model_only_slices_per_s": 20000.0,
    "e2e_volumes_per_s_16_workers": 20.0,
    "train_images_per_s": 1500.0,
    "train_gpu_busy_percent": 90.0,
    "train_batch64_gpu_memory_gb": 8.0,
    "cpu_one_volume_s": 10.0,
}


# ------------------------------------------------------------------------------------------------ helpers


def _torch():
    import torch

    return torch


def _sync(device: Any) -> None:
    torch = _torch()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall and process-CPU seconds of a block (CPU time shows how much of the wall was ours on a shared machine)."""

    def __init__(self, device: Any = "cpu") -> None:
        self.device, self.wall, self.cpu = device, 0.0, 0.0

    def __enter__(self) -> Clock:
        _sync(self.device)
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        _sync(self.device)
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def _rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(who).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def _memory(device: Any) -> dict[str, Any]:
    """Peak host memory of this process and of its finished children (DataLoader workers), peak GPU memory."""
    torch = _torch()
    out: dict[str, Any] = {"host_peak_rss_mb": _rss_mb(), "host_peak_rss_workers_mb": _rss_mb(resource.RUSAGE_CHILDREN)}
    if torch.device(device).type == "cuda":
        out["gpu_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["gpu_peak_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    else:
        out["gpu_peak_allocated_mb"] = out["gpu_peak_reserved_mb"] = None
    return out


def _reset_gpu_peak(device: Any) -> None:
    torch = _torch()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class GpuUtilSampler:
    """Samples ``torch.cuda.utilization`` (NVML) in a thread; ``mean`` is None where NVML is not available."""

    def __init__(self, device: Any, period: float = 0.05) -> None:
        self.device, self.period, self.samples = device, period, []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        torch = _torch()
        if torch.device(self.device).type != "cuda":
            return
        try:
            torch.cuda.utilization(self.device)
        except Exception:  # no pynvml / NVML: leave it unmeasured
            return
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        torch = _torch()
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.samples.append(float(torch.cuda.utilization(self.device)))
            time.sleep(self.period)

    def stop(self) -> float | None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return round(statistics.fmean(self.samples), 1) if self.samples else None


def _literal(text: str) -> Any:
    """A ``--set`` value: a Python/JSON literal when it parses as one, else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config overrides shared by the inference and training configs."""
    out: dict[str, Any] = {
        "bundle_root": str(ROOT),
        "device": f"$torch.device({args.device!r})",
        "image_size": args.image_size,
        "patch_size": args.patch_size,
    }
    if args.amp is not None:
        out["amp"] = args.amp
    for item in args.set:
        key, _, value = item.partition("=")
        out[key.strip()] = _literal(value.strip())
    return out


def load_config(name: str, args: argparse.Namespace, extra: dict[str, Any] | None = None):
    """``configs/<name>`` through MONAI's ``ConfigParser``, with the benchmark's overrides (unknown ids skipped)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / name))
    for key, value in {**_overrides(args), **(extra or {})}.items():
        if key.split("#")[0] in parser.get():
            parser[key] = value
    return parser


def prepare_network(network: Any, args: argparse.Namespace) -> Any:
    """The optional speed-ups applied to a config-built network in place: channels_last, ``Module.compile``.

    ``Module.compile`` compiles in place and keeps the state-dict keys, so the config's ``CheckpointLoader`` still
    loads into it.
    """
    torch = _torch()
    if args.channels_last:
        network.to(memory_format=torch.channels_last)
    if args.compile:
        network.compile(dynamic=True)
    return network


def cpu_bf16(network: Any) -> Any:
    """EXPERIMENT (``--cpu-bf16``): the network under CPU bf16 autocast, outputs back in fp32.

    Not part of the bundle: ``PatchRankingInferer(amp=True)`` autocasts on CUDA only. Used to measure what the
    inferer would gain on a CPU with bf16 instructions (AVX512-BF16 / AMX).
    """
    torch = _torch()

    class _CpuBf16(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.inner(x).float()

    return _CpuBf16(network)


# ------------------------------------------------------------------------------------------------ data


def _generate_one(folder: str, index: int, shape: tuple[int, int, int]) -> None:
    """One phantom (``scripts.synthetic``) as ``BENCH_XXX/BENCH_XXX_{flair,seg}.nii.gz`` in ``folder``."""
    from scripts.synthetic import generate_dataset

    case_id = f"BENCH_{index:03d}"
    final = Path(folder) / case_id
    if (final / f"{case_id}_flair.nii.gz").exists():
        return
    scratch = Path(tempfile.mkdtemp(dir=folder, prefix=f".{case_id}."))
    try:
        generate_dataset(scratch, n_cases=1, shape=shape, seed=index, abnormal_fraction=float(index % 2))
        (scratch / "SYN_000" / "SYN_000_flair.nii.gz").rename(scratch / "SYN_000" / f"{case_id}_flair.nii.gz")
        (scratch / "SYN_000" / "SYN_000_seg.nii.gz").rename(scratch / "SYN_000" / f"{case_id}_seg.nii.gz")
        shutil.rmtree(final, ignore_errors=True)
        (scratch / "SYN_000").rename(final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def default_data_dir(shape: Sequence[int]) -> Path:
    return Path(tempfile.gettempdir()) / "patchgan_benchmark" / f"volumes_{'x'.join(map(str, shape))}"


def ensure_volumes(args: argparse.Namespace) -> tuple[list[dict[str, Any]], float]:
    """The first ``--volumes`` cases of ``--data-dir``; synthetic BraTS-size phantoms are generated (in parallel,
    kept for the next run) when no folder is given. Returns the items and the seconds spent generating."""
    from scripts.data import inference_items

    seconds = 0.0
    if args.data_dir is None:
        folder = default_data_dir(args.volume_shape)
        folder.mkdir(parents=True, exist_ok=True)
        missing = [i for i in range(args.volumes) if not (folder / f"BENCH_{i:03d}" / f"BENCH_{i:03d}_flair.nii.gz").exists()]
        if missing:
            start = time.perf_counter()
            workers = max(1, min(len(missing), os.cpu_count() or 1))
            print(f"benchmark: generating {len(missing)} synthetic volumes {tuple(args.volume_shape)} in {folder}",
                  file=sys.stderr)
            if workers == 1:
                for i in missing:
                    _generate_one(str(folder), i, tuple(args.volume_shape))
            else:
                with ProcessPoolExecutor(workers) as pool:
                    list(pool.map(_generate_one, [str(folder)] * len(missing), missing,
                                  [tuple(args.volume_shape)] * len(missing)))
            seconds = time.perf_counter() - start
        args.data_dir = str(folder)
    items = [item for item in inference_items(args.data_dir, split="training") if item.get("image")]
    items = sorted(items, key=lambda item: item["case_id"])
    if len(items) < args.volumes:
        raise SystemExit(f"{args.data_dir}: {len(items)} cases, --volumes asks for {args.volumes}")
    return items[: args.volumes], seconds


def _write_datalist(path: Path, items: Sequence[dict[str, Any]], split: str, keep_seg: bool) -> Path:
    keys = ("case_id", "image", "seg", "label", "channel") if keep_seg else ("case_id", "image", "channel")
    rows = [{k: item[k] for k in keys if k in item} for item in items]
    path.write_text(json.dumps({"name": "benchmark", "layout": "brats", "dataset_dir": "", split: rows}, indent=1))
    return path


# ------------------------------------------------------------------------------------------------ model-only


def phantom_slices(image_size: int, n: int, seed: int = 0):
    """``n`` normalised brain-like axial slices ``(n, 1, S, S)`` (background 0), from a ``scripts.synthetic``
    phantom at ``image_size``: inputs with real structure and a real foreground for the inferer."""
    torch = _torch()
    from scripts.synthetic import make_phantom
    from scripts.transforms import BrainPercentileNormalized

    depth = max(16, 2 * n)
    flair, _ = make_phantom((image_size, image_size, depth), np.random.default_rng(seed), abnormal=True)
    volume = BrainPercentileNormalized("image").normalise(flair[None])
    middle = depth // 2 - n // 2
    return torch.as_tensor(volume[..., middle : middle + n]).permute(3, 0, 1, 2).contiguous()


def compare_paths(network: Any, plain_network: Any, inferer_kwargs: dict[str, Any], slices: Any,
                  device: Any, amp: bool, slice_batch_size: int) -> dict[str, Any]:
    """Scores of the fast path (batched slices, ``amp``, the prepared ``network``) against the plain per-slice fp32
    path (``slice_batch_size=1``, no amp, ``plain_network``) on the same slices, as a volume ``(1, 1, S, S, n)``."""
    torch = _torch()
    from scripts.inferer import PatchRankingInferer

    volume = slices.permute(1, 2, 3, 0).unsqueeze(0).to(device)
    fast = PatchRankingInferer(**{**inferer_kwargs, "slice_batch_size": slice_batch_size, "amp": amp})
    plain = PatchRankingInferer(**{**inferer_kwargs, "slice_batch_size": 1, "amp": False})
    a, b = fast.score(volume, network), plain.score(volume, plain_network)
    valid = b.slice_valid
    rel = lambda x, y: float(((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).cpu())  # noqa: E731
    bf16 = amp and torch.device(device).type == "cuda"
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
    torch = _torch()
    device = torch.device(args.device)
    _reset_gpu_peak(device)
    parser = load_config("inference.json", args)
    network = parser.get_parsed_content("network").eval()
    base = parser.get_parsed_content("inferer")
    kwargs = {
        "image_size": base.image_size, "patch_size": base.patch_size, "ranking_weights": base.weights or (1.1, 1.0),
        "ranking": base.weights is not None, "inpaint_stride": base.inpaint_stride,
        "min_brain_fraction": base.min_brain_fraction, "foreground": base.foreground,
        "volume_aggregation": base.volume_aggregation, "top_k_slices": base.top_k_slices,
    }
    plain_network = None
    if args.check_slices:
        plain_network = parser.get_parsed_content("network_def").to(device).eval()
        plain_network.load_state_dict(network.state_dict())
    prepare_network(network, args)
    run_network = cpu_bf16(network) if args.cpu_bf16 else network
    out: dict[str, Any] = {
        "what": "PatchRankingInferer.score on resized slices on the device (reconstruct, patch errors, ranking, heatmap)",
        "image_size": args.image_size,
        "parameters": sum(p.numel() for p in network.parameters()),
        "amp_bf16": bool(base.amp and device.type == "cuda"),
    }
    from scripts.inferer import PatchRankingInferer

    for test_input in ("inpaint", "image"):
        passes = base.inpaint_stride**2 if test_input == "inpaint" else 1
        figures: dict[str, Any] = {"network_passes_per_slice": passes}
        for batch in (1, args.infer_batch_size):
            sbs = args.slice_batch_size or (min(passes * batch, 512) if device.type == "cuda" else base.slice_batch_size)
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
    out.update(_memory(device))
    return out


# ------------------------------------------------------------------------------------------------ end to end


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
                _sync(self.device)
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if sync:
                    _sync(self.device)
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
    """End-to-end inference through the inference config over ``items`` (volumes), stage by stage."""
    torch = _torch()
    from scripts.handlers import AnomalyScoreWriter

    device = torch.device(args.device)
    _reset_gpu_peak(device)
    setup = Clock()
    with setup:
        datalist = _write_datalist(work / "e2e_datalist.json", items, "testing", keep_seg=False)
        extra = {"datalist": str(datalist), "output_dir": str(work / "e2e_out"), "num_workers": args.workers,
                 "ckpt_path": str(work / "e2e_model.pt"), "test_input": args.test_input}
        if args.slice_batch_size:
            extra["slice_batch_size"] = args.slice_batch_size
        parser = load_config("inference.json", args, extra)
        network = parser.get_parsed_content("network")
        torch.save(network.state_dict(), work / "e2e_model.pt")  # random weights: speed does not depend on them
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
        if args.cpu_bf16:
            evaluator.network = cpu_bf16(network)
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
        "what": "inference config: DataLoader(read, normalise) -> AnomalyEvaluator(PatchRankingInferer) -> "
                "AnomalyScoreWriter(scores.csv, slice_scores.csv, heatmap .nii.gz, overlay .png)",
        "volumes": n,
        "failed": len(errors),
        "volume_shape": list(args.volume_shape) if args.generated else "from --data-dir",
        "data_dir": args.data_dir,
        "test_input": args.test_input,
        "workers": args.workers,
        "slice_batch_size": inferer.slice_batch_size,
        "amp_bf16": bool(inferer.amp and device.type == "cuda"),
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
        **_memory(device),
    }


# ------------------------------------------------------------------------------------------------ training


def bench_train(args: argparse.Namespace, items: Sequence[dict[str, Any]], work: Path) -> dict[str, Any]:
    """The adversarial step of ``PatchGANTrainer`` fed by the training config's DataLoader from cached slices."""
    torch = _torch()
    from ignite.engine import Events

    device = torch.device(args.device)
    _reset_gpu_peak(device)
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
    prepare_network(parser.get_parsed_content("discriminator"), args)
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
        _sync(device)
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
            _sync(device)
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
        **_memory(device),
    }


def trainer_amp(parser: Any) -> bool:
    return bool(parser.get_parsed_content("amp"))


# ------------------------------------------------------------------------------------------------ report


def device_info(args: argparse.Namespace) -> dict[str, Any]:
    torch = _torch()
    import monai

    device = torch.device(args.device)
    info = {
        "device": str(device),
        "name": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    return info


def check_targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets next to what was measured; GPU targets are not judged on another device."""
    on_cuda = result["device"]["device"].startswith("cuda")
    full = result["config"]["image_size"] == 256 and not result["config"]["quick"]
    out: dict[str, Any] = {}

    def entry(name: str, measured: Any, target: float, higher_better: bool, applies: bool) -> None:
        met = None
        if measured is not None and applies:
            met = measured >= target if higher_better else measured <= target
        out[name] = {"target": target, "measured": measured, "met": met,
                     "note": None if applies else "not applicable on this device / sizes"}

    model = result.get("model") or {}
    best = max((v["slices_per_s"] for k, v in (model.get("inpaint") or {}).items() if k.startswith("batch_")), default=None)
    entry("model_only_slices_per_s", best, TARGETS["model_only_slices_per_s"], True, on_cuda and full)
    e2e = result.get("e2e") or {}
    entry("e2e_volumes_per_s_16_workers", e2e.get("volumes_per_s"), TARGETS["e2e_volumes_per_s_16_workers"], True,
          on_cuda and full and e2e.get("workers") == 16)
    one = e2e.get("wall_s") / e2e["volumes"] if e2e.get("volumes") else None
    entry("cpu_one_volume_s", None if one is None else round(one, 2), TARGETS["cpu_one_volume_s"], False,
          not on_cuda and full)
    train = result.get("train") or {}
    entry("train_images_per_s", train.get("images_per_s"), TARGETS["train_images_per_s"], True, on_cuda and full)
    entry("train_gpu_busy_percent", train.get("gpu_utilization_percent"), TARGETS["train_gpu_busy_percent"], True,
          on_cuda and full)
    mem = train.get("gpu_peak_allocated_mb")
    entry("train_batch64_gpu_memory_gb", None if mem is None else round(mem / 1024, 2),
          TARGETS["train_batch64_gpu_memory_gb"], False, on_cuda and full and train.get("batch_size") == 64)
    return out


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        value = f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value}{unit}"


def table(result: dict[str, Any]) -> str:
    """A short human-readable summary of the JSON."""
    rows: list[tuple[str, str]] = []
    dev = result["device"]
    rows.append(("device", f"{dev['device']} ({dev.get('name')}), {dev['torch_threads']} threads, "
                           f"load {dev['load_average_at_start']}"))
    model = result.get("model")
    if model:
        for ti in ("inpaint", "image"):
            for key, fig in model[ti].items():
                if key.startswith("batch_"):
                    rows.append((f"model {ti} {key}", f"{_fmt(fig['slices_per_s'])} slices/s, "
                                                      f"{_fmt(fig['latency_ms_median'])} ms/call"))
        if model.get("consistency"):
            c = model["consistency"]
            rows.append(("fast vs plain fp32", f"max rel diff {c['slice_scores_max_rel_diff']:.2e} "
                                               f"(tol {c['tolerance_rel']:.0e}) ok={c['within_tolerance']}"))
        rows.append(("model memory", f"host {_fmt(model['host_peak_rss_mb'], ' MiB')}, "
                                     f"GPU {_fmt(model['gpu_peak_allocated_mb'], ' MiB')}"))
    e2e = result.get("e2e")
    if e2e:
        rows.append(("e2e", f"{e2e['volumes']} volumes in {_fmt(e2e['wall_s'], ' s')}: {_fmt(e2e['volumes_per_s'])} vol/s, "
                            f"{_fmt(e2e['slices_per_s'])} slices/s ({e2e['workers']} workers)"))
        stages = ", ".join(f"{k} {_fmt(v, 's')}" for k, v in e2e["stage_s_per_volume"].items())
        rows.append(("e2e per volume", stages))
        rows.append(("e2e bottleneck", e2e["bottleneck"]))
        rows.append(("e2e memory", f"host {_fmt(e2e['host_peak_rss_mb'], ' MiB')} "
                                   f"(workers {_fmt(e2e['host_peak_rss_workers_mb'], ' MiB')}), "
                                   f"GPU {_fmt(e2e['gpu_peak_allocated_mb'], ' MiB')}"))
    train = result.get("train")
    if train:
        rows.append(("train", f"{_fmt(train['images_per_s'])} images/s at batch {train['batch_size']} "
                              f"({_fmt(train['step_ms_median'], ' ms')}/step, data wait "
                              f"{_fmt(train['data_wait_fraction'])}, GPU busy {_fmt(train['gpu_utilization_percent'], '%')})"))
        rows.append(("train memory", f"host {_fmt(train['host_peak_rss_mb'], ' MiB')}, "
                                     f"GPU {_fmt(train['gpu_peak_allocated_mb'], ' MiB')}"))
    for name, t in result.get("targets", {}).items():
        verdict = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        rows.append((f"target {name}", f"{_fmt(t['measured'])} vs {_fmt(t['target'])}: {verdict}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


# ------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.benchmark", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--patch-size", type=int, default=None, help="default: image_size // 8 (32 at 256)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default 64 on CUDA, 16 on CPU)")
    p.add_argument("--infer-batch-size", type=int, default=None,
                   help="the large model-only batch (default 256 on CUDA, 32 on CPU); batch 1 is always measured")
    p.add_argument("--slice-batch-size", type=int, default=None,
                   help="inferer slice_batch_size (default: the config's; model-only on CUDA: min(passes*batch, 512))")
    p.add_argument("--iterations", type=int, default=None, help="timed calls/steps (default 50 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls/steps first (default 10 on CUDA, 1 on CPU)")
    p.add_argument("--volumes", type=int, default=None, help="volumes end to end (default 64 on CUDA, 1 on CPU)")
    p.add_argument("--volume-shape", type=int, nargs=3, default=list(BRATS_SHAPE), metavar=("X", "Y", "Z"))
    p.add_argument("--data-dir", default=None, help="a folder of FLAIR volumes (BraTS/MSD layout); default: "
                                                     "synthetic phantoms generated once into the temp folder")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers for e2e and training (default: min(16, CPU count))")
    p.add_argument("--test-input", default="inpaint", choices=("inpaint", "image"), help="e2e test input")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (CUDA only in the bundle; default: the configs' choice, on with CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks (Module.compile, in place)")
    p.add_argument("--channels-last", action="store_true", help="networks in channels_last memory format")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="EXPERIMENT: bf16 autocast on CPU around the network (not an option of the bundle)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own, one per core); on a shared machine 1 thread "
                        "avoids OpenMP threads waiting for each other")
    p.add_argument("--check-slices", type=int, default=None,
                   help="slices for the fast-vs-plain score check (0 skips; default 4)")
    p.add_argument("--set", action="append", default=[], metavar="ID=VALUE",
                   help="any config override, e.g. --set 'network_def#channels=[16, 32, 64, 128, 256]'")
    p.add_argument("--quick", action="store_true", help="tiny sizes (image 32, 3-level UNet, 48x48x16 volumes)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="run each section in its own process so its peak host memory is its own "
                        "(default: on, off with --quick)")
    p.add_argument("--json", default=None, help="also write the JSON here")
    p.add_argument("--keep", action="store_true", help="keep the work folder (outputs, cache) and print it")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work-dir", default=None, help=argparse.SUPPRESS)
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the device-dependent defaults and the --quick sizes."""
    torch = _torch()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = torch.device(args.device).type == "cuda"
    if args.quick:
        for key in ("volumes", "iterations", "warmup", "batch_size", "infer_batch_size", "check_slices"):
            if getattr(args, key) is None:
                setattr(args, key, QUICK[key])
        if args.image_size == 256:
            args.image_size = QUICK["image_size"]
            args.patch_size = args.patch_size or QUICK["patch_size"]
        if list(args.volume_shape) == list(BRATS_SHAPE):
            args.volume_shape = list(QUICK["volume_shape"])
        args.set = [*QUICK["set"], *args.set]
        if args.isolate is None:
            args.isolate = False
        if args.workers is None:
            args.workers = 0
    defaults = {"batch_size": (64, 16), "infer_batch_size": (256, 32), "iterations": (50, 3), "warmup": (10, 1),
                "volumes": (64, 1), "check_slices": (4, 4)}
    for key, (gpu, cpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, gpu if cuda else cpu)
    if args.workers is None:
        args.workers = min(16, os.cpu_count() or 1)
    if args.patch_size is None:
        args.patch_size = max(args.image_size // 8, 1)
    if args.isolate is None:
        args.isolate = True
    args.generated = args.data_dir is None
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown or not sections:
        raise SystemExit(f"--only: unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    args.sections = sections
    return args


def run_sections(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run the asked sections in this process."""
    out: dict[str, Any] = {}
    items: list[dict[str, Any]] = []
    if {"e2e", "train"} & set(args.sections):
        items, generated_s = ensure_volumes(args)
        if generated_s:
            out["data_generation_s"] = round(generated_s, 2)
    runners = {"model": lambda: bench_model(args), "e2e": lambda: bench_e2e(args, items, work),
               "train": lambda: bench_train(args, items, work)}
    for name in args.sections:
        out[name] = runners[name]()
    return out


def _child_argv(argv: Sequence[str], section: str, json_path: Path, work: Path, data_dir: str | None) -> list[str]:
    """This command line for one section in a child process."""
    skip_value = {"--only", "--json", "--work-dir", "--data-dir", "--isolate", "--no-isolate"}
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        name = token.split("=", 1)[0]
        if name in skip_value:
            skip = "=" not in token and name not in ("--isolate", "--no-isolate")
            continue
        out.append(token)
    out += ["--only", section, "--json", str(json_path), "--work-dir", str(work), "--no-isolate", "--child"]
    if data_dir:
        out += ["--data-dir", data_dir]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve_args(build_parser().parse_args(argv))
    if args.threads:
        _torch().set_num_threads(args.threads)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="patchgan_benchmark_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.isolate and not args.child:
            generated = args.data_dir is None
            sections: dict[str, Any] = {}
            if {"e2e", "train"} & set(args.sections):
                _, generated_s = ensure_volumes(args)  # once, before the children (they reuse the folder)
                if generated_s:
                    sections["data_generation_s"] = round(generated_s, 2)
            for section in args.sections:
                path = work / f"{section}.json"
                cmd = [sys.executable, "-m", "scripts.benchmark",
                       *_child_argv(argv, section, path, work / section, args.data_dir)]
                subprocess.run(cmd, cwd=ROOT, check=True)
                sections.update(json.loads(path.read_text())["sections"])
            args.generated = generated
            scope = "section (own process)"
        else:
            sections = run_sections(args, work)
            scope = "section (own process)" if args.child else "process so far (sections share one process)"
        result = {
            "device": device_info(args),
            "config": {
                "image_size": args.image_size, "patch_size": args.patch_size, "quick": args.quick,
                "amp": args.amp, "compile": args.compile, "channels_last": args.channels_last,
                "cpu_bf16_experiment": args.cpu_bf16, "workers": args.workers, "overrides": args.set,
                "threads": _torch().get_num_threads(), "host_peak_memory_scope": scope, "command": "python -m scripts.benchmark " + " ".join(argv),
            },
        }
        result.update(sections)
        result["targets"] = check_targets(result)
        text = json.dumps({"sections": sections} if args.child else result, indent=2, default=str)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(text + "\n")
        if not args.child:
            print(text)
            print(table(result), file=sys.stderr)
    finally:
        if args.keep and not args.child:
            print(f"benchmark: work folder kept at {work}", file=sys.stderr)
        elif not args.child and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
