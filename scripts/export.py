"""Exported reconstructors: ONNX export, and anomaly scoring from an exported file without the Python model code.

TorchScript comes from MONAI's own exporter (``python -m monai.bundle ckpt_export network_def ...``); ONNX from
MONAI's ``onnx_export`` with the settings this bundle needs (``python -m scripts.export onnx ...``): the legacy
TorchScript-based ``torch.onnx`` exporter (the dynamo one needs ``onnxscript``, which the bundle does not
require), a dynamic batch axis (the inferer sends variable numbers of slices) and a check of the file against
PyTorch with onnxruntime.

Scoring re-implements nothing: ``load_exported`` gives a module that runs the exported file (``torch.jit`` for
``.ts``, onnxruntime for ``.onnx``); the bundle's ``PatchRankingInferer`` feeds it the in-painting passes
(``scripts.scoring.patches.checkerboard_masks``) and turns its reconstructions into patch errors, ranked scores and
heatmaps with the ``scripts.scoring`` functions, exactly as for the PyTorch network. ``score`` runs the bundle's
inference workflow (``configs/inference.json``: same preprocessing, inferer and output files) with the exported
file in place of ``network_def`` and its checkpoint; ``scripts.model.networks`` is not imported.

CLI::

    python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\
        --meta_file configs/metadata.json --config_file configs/inference.json
    python -m scripts.export onnx --filepath models/model.onnx [--ckpt_file models/model.pt] [overrides]
    python -m scripts.export score --model models/model.onnx --input_path FILE_OR_DIR_OR_DATALIST \\
        --output_dir out [overrides, e.g. --image_size 256 --ranking False]

Overrides are config ids, as for ``monai.bundle run``; scoring needs the ``image_size``/``patch_size`` the model
was trained with (and ``in_channels`` for ONNX export), and the default maps read the ``residual_calibration.pt``
that training wrote, shipped beside the exported file (or ``--residual_calibration_path``). The ``critic`` score map needs the critic, which is
not exported: use the squared, one-sided (hyperintense / hypointense) or SSIM maps with an exported reconstructor.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scripts.config import bundle_parser

ONNX_INPUT, ONNX_OUTPUT = "image", "pred"
ONNX_OPSET = 17
MODEL_IMPORT = "$import scripts.model.networks"
BUNDLE_ROOT = Path(__file__).resolve().parents[1]


class OnnxNetwork(nn.Module):
    """An exported reconstructor run by onnxruntime, called like the PyTorch network: ``(N, C, S, S) -> same``.

    It has no parameters; inputs are moved to the CPU for onnxruntime (or run on the given ``providers``) and the
    output comes back on the input's device as float32.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int = 0) -> None:
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.path = str(path)
        self.session = onnxruntime.InferenceSession(
            self.path, sess_options=options, providers=list(providers or ["CPUExecutionProvider"])
        )
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self.session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(out).to(images.device)


def load_exported(path: str | os.PathLike, device: torch.device | str = "cpu") -> nn.Module:
    """The exported reconstructor at ``path`` as a callable module in eval mode: ``.onnx`` or TorchScript."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no exported model there (export it first, see scripts/export.py)")
    if path.suffix.lower() == ".onnx":
        return OnnxNetwork(path).eval()
    module = torch.jit.load(str(path), map_location=device).eval()
    for parameter in module.parameters():  # an inference-only module: no autograd graph from its outputs
        parameter.requires_grad_(False)
    return module


def onnx_export(
    filepath: str | os.PathLike = "models/model.onnx",
    ckpt_file: str | os.PathLike = "models/model.pt",
    config_file: str | Sequence[str] = "configs/inference.json",
    meta_file: str | None = None,
    net_id: str = "network_def",
    opset_version: int = ONNX_OPSET,
    atol: float = 1e-4,
    **override: Any,
) -> Path:
    """Export ``net_id`` with the weights of ``ckpt_file`` to ONNX via MONAI's ``onnx_export``; returns the path.

    The example input is ``(1, in_channels, image_size, image_size)`` from the config (with ``override``); the
    batch axis stays dynamic. onnxruntime's output is checked against PyTorch's (``atol``) before saving.
    """
    from monai.bundle import onnx_export as monai_onnx_export

    parser = bundle_parser(config_file, override, meta_file)
    size, channels = int(parser.get_parsed_content("image_size")), int(parser.get_parsed_content("in_channels"))
    dynamic = {ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}}
    converter_kwargs = {
        "input_names": [ONNX_INPUT], "output_names": [ONNX_OUTPUT], "dynamic_axes": dynamic,
        "opset_version": opset_version, "verify": True, "use_ort": True, "rtol": 1e-4, "atol": atol,
    }
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        converter_kwargs["dynamo"] = False
    Path(filepath).parent.mkdir(parents=True, exist_ok=True)
    monai_onnx_export(
        net_id=net_id, filepath=str(filepath), ckpt_file=str(ckpt_file), config_file=config_file, meta_file=meta_file,
        use_trace=True, input_shape=[1, channels, size, size], converter_kwargs=converter_kwargs, **override,
    )
    return Path(filepath)


def score(
    model: str | os.PathLike,
    config_file: str | Sequence[str] | None = None,
    **override: Any,
) -> None:
    """Run the bundle's inference workflow with the exported ``model`` as the network (no ``network_def``, no
    checkpoint, ``scripts.model.networks`` never imported); every other config id can be overridden as usual.

    ``config_file`` defaults to this bundle's ``configs/inference.json`` (add e.g. ``configs/dermoscopy.json``
    as a list, as for ``monai.bundle run``).
    """
    from monai.bundle import ConfigWorkflow

    if config_file is None:
        config_file = str(BUNDLE_ROOT / "configs" / "inference.json")
    configs = [config_file] if isinstance(config_file, (str, os.PathLike)) else list(config_file)
    workflow = ConfigWorkflow(config_file=[str(c) for c in configs], workflow_type="infer", logging_file=None)
    parser = workflow.parser
    parser["bundle_root"] = override.pop("bundle_root", str(BUNDLE_ROOT))
    parser["residual_calibration_path"] = str(Path(model).resolve().parent / "residual_calibration.pt")
    for key, value in override.items():
        parser[key] = value
    if {"critic", "feature"} & set(parser.get_parsed_content("score_maps")):
        raise ValueError("the 'critic' and 'feature' score maps need the critic, which is not exported; "
                         "use 'squared', 'hyperintense', 'hypointense' or 'ssim'")
    parser["imports"] = [item for item in parser["imports"] if item.strip() != MODEL_IMPORT]
    parser["network"] = {"_target_": "scripts.export.load_exported", "path": str(model), "device": "@device"}
    parser["network_def"] = parser["critic_def"] = parser["critic_module"] = parser["critic"] = None
    for index, handler in enumerate(parser["handlers"]):
        if handler.get("_target_", "").endswith("CheckpointLoader") and "model" in handler.get("load_dict", {}):
            parser[f"handlers#{index}#_disabled_"] = True
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def main() -> None:
    import fire

    fire.Fire({"onnx": onnx_export, "score": score})


if __name__ == "__main__":
    main()
