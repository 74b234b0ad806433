"""Speed and memory benchmark of the bundle on the current device: ``python -m experiments.benchmark``.

Everything is built from the bundle's own configs (``configs/inference.json``, ``configs/train.json``) through
MONAI's ``ConfigParser``, with overrides for device, sizes and paths, so the figures are those of the code a user
runs. Three sections, each timed on its own:

- ``model``: model-only inference, ``PatchRankingInferer.score`` (reconstruction, patch errors, ranking, heatmap)
  on resized slices already on the device: latency at batch 1 and throughput at a large batch, for the default
  in-painting test input (``inpaint_stride**2`` network passes) and for ``test_input: image`` (one pass).
  It also checks that the fast path (batched slices, and bf16 / channels_last / compile when asked for) gives the
  scores of the plain per-slice fp32 path.
- ``e2e``: end-to-end inference over a folder of BraTS-size FLAIR volumes (240x240x155 ``.nii.gz``, generated with
  ``scripts.data.synthetic`` when no ``--data-dir`` is given): the inference config's DataLoader, ``AnomalyScorer``
  and ``AnomalyScoreWriter``, from reading the files to the written scores, heatmaps and overlays. Stages are
  timed separately (read, normalise, network, writing, waiting for data) and the slowest is named.
- ``train``: the full adversarial step of ``PatchGANTrainer`` (D update, R update) fed by the training config's
  DataLoader from the slice cache, images/s after ``--warmup`` iterations.

Each section reports its peak host memory (``resource.getrusage``; the section runs in its own process unless
``--no-isolate``) and, on CUDA, its peak GPU memory (``torch.cuda.max_memory_allocated``).

The JSON goes to stdout (and ``--json PATH``), a short table to stderr::

    python -m experiments.benchmark                                  # everything, default sizes
    python -m experiments.benchmark --only e2e --volumes 1           # one BraTS-size volume end to end
    python -m experiments.benchmark --device cuda --amp --compile --workers 16 --volumes 64
    python -m experiments.benchmark --quick                          # tiny sizes: a smoke test in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.benchmark.common import BRATS_SHAPE, QUICK, ROOT, SECTIONS, device_info, lazy_torch
from experiments.benchmark.data import ensure_volumes
from experiments.benchmark.e2e import bench_e2e
from experiments.benchmark.model import bench_model
from experiments.benchmark.report import check_targets, table
from experiments.benchmark.train import bench_train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__.split("\n\n")[0],
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
    torch = lazy_torch()
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
        lazy_torch().set_num_threads(args.threads)
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
                cmd = [sys.executable, "-m", "experiments.benchmark",
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
                "workers": args.workers, "overrides": args.set,
                "threads": lazy_torch().get_num_threads(), "host_peak_memory_scope": scope, "command": "python -m experiments.benchmark " + " ".join(argv),
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
