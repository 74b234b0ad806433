"""Shared pieces of the benchmark: clocks, memory and GPU-utilisation probes, config loading, network speed-ups."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from scripts.config import bundle_parser, parse_override

ROOT = Path(__file__).resolve().parents[2]
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
        "critic_def#channels=8",
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


def lazy_torch():
    import torch

    return torch


def sync_device(device: Any) -> None:
    torch = lazy_torch()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall and process-CPU seconds of a block (CPU time shows how much of the wall was ours on a shared machine)."""

    def __init__(self, device: Any = "cpu") -> None:
        self.device, self.wall, self.cpu = device, 0.0, 0.0

    def __enter__(self) -> Clock:
        sync_device(self.device)
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        sync_device(self.device)
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(who).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def memory_figures(device: Any) -> dict[str, Any]:
    """Peak host memory of this process and of its finished children (DataLoader workers), peak GPU memory."""
    torch = lazy_torch()
    out: dict[str, Any] = {"host_peak_rss_mb": rss_mb(), "host_peak_rss_workers_mb": rss_mb(resource.RUSAGE_CHILDREN)}
    if torch.device(device).type == "cuda":
        out["gpu_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["gpu_peak_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    else:
        out["gpu_peak_allocated_mb"] = out["gpu_peak_reserved_mb"] = None
    return out


def reset_gpu_peak(device: Any) -> None:
    torch = lazy_torch()
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
        torch = lazy_torch()
        if torch.device(self.device).type != "cuda":
            return
        try:
            torch.cuda.utilization(self.device)
        except Exception:  # no pynvml / NVML: leave it unmeasured
            return
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        torch = lazy_torch()
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.samples.append(float(torch.cuda.utilization(self.device)))
            time.sleep(self.period)

    def stop(self) -> float | None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return round(statistics.fmean(self.samples), 1) if self.samples else None


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
    out.update(dict(map(parse_override, args.set)))
    return out


def load_config(name: str, args: argparse.Namespace, extra: dict[str, Any] | None = None):
    """``configs/<name>`` through the bundle's ``ConfigParser``, with the benchmark's overrides (unknown ids skipped)."""
    parser = bundle_parser(ROOT / "configs" / name)
    parser.update({key: value for key, value in {**_overrides(args), **(extra or {})}.items()
                   if key.split("#")[0] in parser.get()})
    return parser


def prepare_network(network: Any, args: argparse.Namespace) -> Any:
    """The optional speed-ups applied to a config-built network in place: channels_last, ``Module.compile``.

    ``Module.compile`` compiles in place and keeps the state-dict keys, so the config's ``CheckpointLoader`` still
    loads into it.
    """
    torch = lazy_torch()
    if args.channels_last:
        network.to(memory_format=torch.channels_last)
    if args.compile:
        network.compile(dynamic=True)
    return network


def device_info(args: argparse.Namespace) -> dict[str, Any]:
    torch = lazy_torch()
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
