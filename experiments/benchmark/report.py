"""The benchmark's verdicts against its targets and the short table it prints."""

from __future__ import annotations

from typing import Any

from experiments.benchmark.common import TARGETS


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
