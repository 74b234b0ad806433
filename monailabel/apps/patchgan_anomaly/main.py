"""A MONAI Label app serving this bundle with MONAI Label's own ``BundleInferTask`` and ``BundleTrainTask``.

Nothing here is specific to the model: the tasks read everything from the bundle's configs (``network_def``,
``preprocessing``, ``inferer``, ``postprocessing``, ``network``, ``train#...``, ``validate#...``, run id ``run``).
The bundle lives in ``<app>/model/<name>`` (as in MONAI Label's stock ``monaibundle`` app) or wherever
``--conf bundle PATH`` says.

    monailabel start_server --app monailabel/apps/patchgan_anomaly --studies /data/flair_studies \\
        --conf bundle /path/to/patchgan_ranking_anomaly --host 127.0.0.1 --port 8000

(``--host 127.0.0.1``: MONAI Label's default answers on every interface without authentication.)

Training uses the studies that have a final label: an all-zero label marks a normal study; a lesion mask keeps
the study's lesion-free slices only (see docs/README.md, "MONAI Label").
"""

import json
import logging
import os
from typing import Dict

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask

logger = logging.getLogger(__name__)

DEFAULT_BUNDLE = "patchgan_ranking_anomaly"


class PatchGANAnomalyApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        default = os.path.join(app_dir, "model", DEFAULT_BUNDLE)
        self.bundle = os.path.realpath(conf.get("bundle", default))
        with open(os.path.join(self.bundle, "configs", "metadata.json")) as handle:
            meta = json.load(handle)
        self.model_name = conf.get("model_name", meta["name"])
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"Patch-GAN anomaly detection ({self.model_name})",
            description=meta.get("task", ""),
            version=meta.get("version", ""),
        )

    def init_infers(self) -> Dict[str, InferTask]:
        task = BundleInferTask(self.bundle, self.conf)
        if not task.is_valid():
            logger.warning(f"bundle {self.bundle} has no usable inference (models/model.pt or model.ts missing?)")
            return {}
        logger.info(f"+++ Adding Inferer:: {self.model_name} => {self.bundle}")
        return {self.model_name: task}

    def init_trainers(self) -> Dict[str, TrainTask]:
        task = BundleTrainTask(self.bundle, self.conf)
        if not task.is_valid():
            return {}
        logger.info(f"+++ Adding Trainer:: {self.model_name} => {self.bundle}")
        return {self.model_name: task}

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"random": Random(), "first": First()}
