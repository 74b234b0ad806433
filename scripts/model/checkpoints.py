"""Checkpoints that survive a kill and resume to the same result: MONAI's saver and loader, made safe.

- ``CheckpointSaver`` writes every file through the bundle's one atomic write and removes the file it replaces only
  once the new one is complete (ignite removes first, then saves: a kill in between left nothing to resume from).
- ``ResumeState`` travels in every training checkpoint: the best validation metric so far (so that the first
  validation after a resume does not replace ``model.pt`` with a worse model) and the random states (torch, numpy,
  Python, and every random transform of the training pipeline), so a resumed run draws the same boxes and batches
  as an uninterrupted one.
- ``CheckpointLoader`` says in words what is wrong with a checkpoint: missing, not a checkpoint, or weights of
  another network (which parameters differ, and which config ids set them).
- ``CriticSnapshots`` keeps the critic of the last validation epochs (``critic_snapshots.pt``), and
  ``critic_ensemble`` makes them the critic that inference scores with.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import re
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler
from monai import handlers as monai_handlers
from monai.transforms import Compose, Randomizable

from scripts.data.io import InputError, write_atomic
from scripts.model.networks import CriticEnsemble

logger = logging.getLogger(__name__)

EPOCH_FILE = re.compile(r"epoch=(\d+)")
NETWORK_IDS = "network_def#channels, network_def#strides, network_def#num_res_units, in_channels, critic_def#channels"


class AtomicDiskSaver(BaseSaveHandler):
    """ignite save handler: atomic writes, and removal of the replaced file only after the new one is in place."""

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        self.dirname, self.filename = Path(dirname), filename
        self._pending: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        name = self.filename or filename
        write_atomic(self.dirname / name, lambda handle: torch.save(checkpoint, handle))
        for old in self._pending:
            if old != name:
                (self.dirname / old).unlink(missing_ok=True)
        self._pending.clear()

    def remove(self, filename: str) -> None:
        self._pending.append(self.filename or filename)


class CheckpointSaver(monai_handlers.CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) writing through ``AtomicDiskSaver``."""

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(save_dir, getattr(checkpoint.save_handler, "filename", None))

    def best_state(self) -> dict[str, Any]:
        """The key-metric tracking list (which score the saved best file has), empty without a key metric."""
        return self._key_metric_checkpoint.state_dict() if self._key_metric_checkpoint is not None else {}

    def load_best_state(self, state: Mapping[str, Any]) -> None:
        if self._key_metric_checkpoint is not None and state:
            self._key_metric_checkpoint.load_state_dict(dict(state))


class CriticSnapshots:
    """The critic's weights at the last ``count`` of the epochs ``interval`` apart, written to ``path`` (one file:
    ``{"epochs": [...], "critics": [state dicts]}``) when training completes; ``count`` 0 keeps none.

    Why: the critic's judgement swings from epoch to epoch (ISIC 2016, 64 px: lesion-vs-skin patch AUROC of single
    epochs' critics 0.80-0.95 in one training); ``critic_ensemble`` averages the snapshots' judgements. A state-dict
    object: it travels in the training checkpoints, so a resumed run ends with the same snapshots; a checkpoint
    written at a snapshot epoch holds that epoch's snapshot whichever handler runs first.
    """

    def __init__(self, critic: torch.nn.Module, path: str | os.PathLike, count: int, interval: int) -> None:
        if int(count) < 0 or int(interval) < 1:
            raise ValueError(f"critic snapshots: count must be >= 0 and interval >= 1, got {count} and {interval}")
        self.critic, self.path, self.count, self.interval = critic, Path(path), int(count), int(interval)
        self.snapshots: deque[tuple[int, dict[str, torch.Tensor]]] = deque(maxlen=max(self.count, 1))
        self.engine: Engine | None = None

    def attach(self, engine: Engine) -> None:
        self.engine = engine
        engine.add_event_handler(Events.STARTED, self.drop_stale)
        if self.count:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self.take)
            engine.add_event_handler(Events.COMPLETED, self.save)

    def drop_stale(self, engine: Engine | None = None) -> None:
        """Remove the snapshots file an earlier run left in the folder: the new ``model.pt`` must not be scored with
        another training's critics. A resumed run loses nothing: its snapshots travel in the checkpoint and are
        written again when it completes."""
        self.path.unlink(missing_ok=True)

    def take(self, engine: Engine) -> None:
        epoch = int(engine.state.epoch)
        if self.snapshots and self.snapshots[-1][0] == epoch:
            return
        weights = {k: v.detach().to("cpu", copy=True) for k, v in self.critic.state_dict().items()}
        self.snapshots.append((epoch, weights))

    def save(self, engine: Engine | None = None) -> None:
        if self.snapshots:
            write_atomic(self.path, lambda handle: torch.save(self.state_dict(), handle))
            logger.info("critic snapshots of epochs %s in %s", [e for e, _ in self.snapshots], self.path)

    def state_dict(self) -> dict[str, Any]:
        engine = self.engine
        if self.count and engine is not None and engine.state.epoch and engine.state.epoch % self.interval == 0:
            self.take(engine)  # a checkpoint saver that runs before ``take`` at a snapshot epoch still gets it
        return {"epochs": [e for e, _ in self.snapshots], "critics": [w for _, w in self.snapshots]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.snapshots.clear()
        self.snapshots.extend(zip(state["epochs"], state["critics"]))


def has_critic_snapshots(snapshots_path: str | os.PathLike | None) -> bool:
    """Whether ``snapshots_path`` names a snapshots file: then the critic maps score with their ensemble
    (``critic_ensemble``) and the single critic of ``checkpoint_best.pt`` is not read."""
    return bool(snapshots_path) and Path(snapshots_path).is_file()


def critic_ensemble(critic: torch.nn.Module, snapshots_path: str | os.PathLike) -> torch.nn.Module:
    """The critic to score with: a ``CriticEnsemble`` of the snapshots in ``snapshots_path`` (``CriticSnapshots``)
    when that file exists, else ``critic`` itself (loaded elsewhere, from ``checkpoint_best.pt``).

    Each member is a copy of ``critic`` (same architecture and device) holding one snapshot's weights; a file that
    is not a snapshot file, or whose weights do not fit the configured critic, is refused naming the file.
    """
    if not has_critic_snapshots(snapshots_path):
        return critic
    path = Path(snapshots_path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        members = []
        for weights in state["critics"]:
            member = copy.deepcopy(critic)
            member.load_state_dict(weights)
            members.append(member.eval())
    except RuntimeError as error:  # weights of another critic: which parameters differ, and which ids set them
        raise InputError(f"{path}: {_load_problem(error, {'critics': None})}") from error
    except Exception as error:  # a text file, a truncated file, a torch file without snapshots
        raise InputError(f"{path}: not a critic snapshots file ({type(error).__name__}: {error})") from error
    logger.info("scoring with the critics of epochs %s (%s)", list(state.get("epochs", [])), path)
    return CriticEnsemble(members)


class ResumeState:
    """What a resumed training needs beyond weights, optimizers and the trainer's counters (a state-dict object).

    Args:
        evaluator: the validation engine (its best metric and epoch).
        savers: the validation's key-metric savers (``model.pt``, ``checkpoint_best.pt``).
        transforms: the training pipeline, whose random transforms' states are kept.
    """

    def __init__(self, evaluator: Any, savers: Sequence[CheckpointSaver], transforms: Compose | None = None) -> None:
        self.evaluator, self.savers, self.transforms = evaluator, list(savers), transforms

    def _random_transforms(self) -> list[Randomizable]:
        """The pipeline's random transforms, nested ``Compose`` included (walked by hand: building a ``Compose``,
        as ``Compose.flatten`` does, re-seeds every transform and would change the run)."""
        found, stack = [], [self.transforms] if self.transforms is not None else []
        while stack:
            transform = stack.pop(0)
            if isinstance(transform, Compose):
                stack[:0] = list(transform.transforms)
            elif isinstance(transform, Randomizable):
                found.append(transform)
        return found

    def state_dict(self) -> dict[str, Any]:
        state = self.evaluator.state
        return {
            "best_metric": float(getattr(state, "best_metric", -1.0)),
            "best_metric_epoch": int(getattr(state, "best_metric_epoch", -1)),
            "savers": [saver.best_state() for saver in self.savers],
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": _numpy_state(np.random.get_state()),
            "python_rng": random.getstate(),
            "transform_rng": [_numpy_state(t.R.get_state()) for t in self._random_transforms()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        for saver, saved in zip(self.savers, state["savers"]):
            saver.load_best_state(saved)
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(_numpy_tuple(state["numpy_rng"]))
        random.setstate(_python_state(state["python_rng"]))
        transforms = self._random_transforms()
        if len(transforms) != len(state["transform_rng"]):
            raise ValueError(f"the checkpoint has {len(state['transform_rng'])} random transforms' states, the training "
                             f"pipeline {len(transforms)}: resume with the configs the run was started with")
        for transform, saved in zip(transforms, state["transform_rng"]):
            transform.R.set_state(_numpy_tuple(saved))


def _numpy_state(state: tuple) -> dict[str, Any]:
    """A numpy ``RandomState`` state as tensors and numbers (what ``torch.load(weights_only=True)`` reads back)."""
    name, keys, pos, has_gauss, cached = state
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_tuple(state: Mapping[str, Any]) -> tuple:
    return (state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["cached"])


def _python_state(state: Sequence) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss


# ----------------------------------------------------------------------------------------------- loading


class CheckpointLoader(monai_handlers.CheckpointLoader):
    """MONAI's ``CheckpointLoader`` (same arguments) whose failures name the file and say what is wrong."""

    def __call__(self, engine: Any) -> None:
        path = Path(self.load_path)
        if not path.is_file():
            raise InputError(f"{path}: checkpoint not found")
        try:
            super().__call__(engine)
        except (RuntimeError, KeyError, ValueError) as error:
            raise InputError(f"{path}: {_load_problem(error, self.load_dict)}") from error
        except Exception as error:  # unpickling fails in many ways: a text file, a truncated or foreign file
            raise InputError(f"{path}: not a PyTorch checkpoint ({type(error).__name__}: {error})") from error


def _load_problem(error: BaseException, load_dict: Mapping[str, Any]) -> str:
    """The problem in a sentence: which entries are missing, or which parameters differ from the network's."""
    text = str(error)
    if isinstance(error, KeyError) or "not found in checkpoint" in text or "Key '" in text:
        return (f"not a checkpoint with {sorted(load_dict)} ({text.strip()}); a training run resumes from "
                "checkpoint_final.pt or checkpoint_epoch=N.pt, not from model.pt or checkpoint_best.pt")
    sizes = re.findall(r"size mismatch for ([\w.]+): copying a param with shape (torch.Size\(\[[\d, ]*\]\)) from "
                       r"checkpoint, the shape in current model is (torch.Size\(\[[\d, ]*\]\))", text)
    missing = re.search(r"Missing key\(s\) in state_dict: ([^.]*)", text)
    if sizes or missing or "Unexpected key" in text:
        shown = "; ".join(f"{name}: checkpoint {a[10:]}, network {b[10:]}" for name, a, b in sizes[:3])
        detail = shown or (missing.group(1)[:200] if missing else text.splitlines()[0][:200])
        return (f"its weights do not fit the configured network ({detail}{' ...' if len(sizes) > 3 else ''}); "
                f"set the config ids it was trained with ({NETWORK_IDS})")
    return text.splitlines()[0] if text else type(error).__name__


def resolve_resume(resume_from: str, ckpt_dir: str | os.PathLike) -> str:
    """``resume_from`` as a path: ``latest`` picks the newest training checkpoint in ``ckpt_dir``.

    The newest is the periodic ``checkpoint_epoch=N.pt`` of the highest N, or ``checkpoint_final.pt`` when the run
    finished. Any other value is returned as given (empty: no resume).
    """
    if resume_from != "latest":
        return resume_from
    folder = Path(ckpt_dir)
    periodic = sorted(folder.glob("checkpoint_epoch=*.pt"), key=lambda p: int(EPOCH_FILE.search(p.name).group(1)))
    final = folder / "checkpoint_final.pt"
    candidates = ([final] if final.is_file() else []) + periodic[::-1]
    if not candidates:
        raise InputError(f"{folder}: no training checkpoint to resume from (checkpoint_epoch=N.pt or checkpoint_final.pt)")
    logger.info("resuming from %s", candidates[0])
    return str(candidates[0])
