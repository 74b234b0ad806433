"""Shared pytest fixtures."""

from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder ``../shared/data`` beside the checkout; the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


def save_untrained(state_dict: Mapping[str, torch.Tensor], path: Path, channels: int = 1) -> Path:
    """Seed untrained weights as ``path`` (``model.pt``) with the neutral residual calibration beside it, as a bundle
    that has not been trained needs for the default maps (``docs/README.md``, MONAI Label); returns ``path``."""
    from scripts.scoring.calibration import neutral_residual_calibration

    torch.save(dict(state_dict), path)
    torch.save(neutral_residual_calibration(channels), Path(path).parent / "residual_calibration.pt")
    return Path(path)


@pytest.fixture(scope="session")
def untrained() -> Callable[..., Path]:
    """``save_untrained``, for tests that score with weights they made up."""
    return save_untrained
