"""The baselines of the comparison: each trains one short epoch on tiny synthetic volumes and scores them."""

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import OneClassSVM

from experiments.compare.folds import Fold
from experiments.compare.runs import METHODS, Settings, infer, train_model
from scripts.baselines.alocc import ALOCCInferer
from scripts.baselines.ocsvm import KernelOCSVM, PixelOCSVM
from scripts.baselines.ocsvm_guided import GuidedReconstructionLoss, LatentAutoEncoder
from scripts.baselines.ocsvm_layer import fit_latent_ocsvm
from scripts.data.datalist import build_datalist
from scripts.data.synthetic import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
SLICE_HEADER = ["case_id", "slice_index", "score", "trivial_intensity", "trivial_position"]
TINY = Settings(image_size=32, patch_size=8, max_epochs=1, batch_size=8, channels=[8, 16, 32],
                        overrides={"network_def#num_res_units": 1, "min_lesion_voxels": 5})


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def roundtrip(module: torch.nn.Module, fresh: torch.nn.Module) -> torch.nn.Module:
    """Save a state dict and load it into a fresh module as the bundle's CheckpointLoader does (weights only)."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


def test_kernel_ocsvm_equals_scikit_learn_and_loads_from_a_weights_only_checkpoint():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(120, 30)), 1.5 * rng.normal(size=(25, 30))
    pipelines = [
        Pipeline([("s", StandardScaler()), ("p", PCA(0.95, svd_solver="full")),
                  ("o", OneClassSVM(nu=0.1, gamma="scale"))]).fit(train),
        fit_latent_ocsvm(train, 0.03),
    ]
    for pipeline in pipelines:
        scorer = roundtrip(KernelOCSVM().load_pipeline(pipeline), KernelOCSVM())
        assert scorer.fitted
        np.testing.assert_allclose(-scorer(torch.tensor(test)).numpy(), pipeline.decision_function(test), atol=1e-9)


def test_kernel_ocsvm_rejects_what_it_cannot_represent():
    data = np.random.default_rng(0).normal(size=(20, 4))
    with pytest.raises(ValueError, match="rbf"):
        KernelOCSVM().load_pipeline(OneClassSVM(kernel="linear").fit(data))
    with pytest.raises(ValueError, match="whiten|unsupported"):
        KernelOCSVM().load_pipeline(Pipeline([("p", PCA(2, whiten=True)), ("o", OneClassSVM())]).fit(data))
    with pytest.raises(RuntimeError, match="not fitted"):
        KernelOCSVM()(torch.zeros(2, 4))


def test_pixel_ocsvm_scores_an_outlier_above_normal_images():
    rng = np.random.default_rng(1)
    normal = (0.5 + 0.05 * rng.standard_normal((60, 1, 16, 16))).astype(np.float32)
    model = PixelOCSVM(size=8).fit(normal)
    outlier = torch.full((1, 1, 16, 16), 0.5)
    outlier[..., 4:12, 4:12] = 2.0
    scores = model(torch.cat([torch.as_tensor(normal[:5]), outlier]))
    assert scores.shape == (6,) and torch.isfinite(scores).all()
    assert scores[-1] > scores[:-1].max()


def test_guided_loss_adds_the_latent_term_and_reaches_the_encoder():
    torch.manual_seed(0)
    net = LatentAutoEncoder(image_size=16, channels=(4, 8), strides=(2,), num_res_units=0, latent_dim=6)
    loss = GuidedReconstructionLoss(net, nu=0.2, weight=1.0)
    x = torch.rand(8, 1, 16, 16)
    total, rec, adv = loss(net(x), x, None)
    assert net.latent.shape == (8, 6) and adv.item() == 0.0
    assert total.item() >= rec.item()
    total.backward()
    assert net.to_latent.weight.grad is not None and torch.isfinite(net.to_latent.weight.grad).all()
    small = torch.rand(3, 1, 16, 16)  # too few codes for two halves: reconstruction only
    total, rec, _ = loss(net(small), small, None)
    assert total.item() == pytest.approx(rec.item())


def test_alocc_score_is_one_minus_the_critic_probability():
    critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1))
    inferer = ALOCCInferer(image_size=8, patch_size=4, test_input="image", foreground="all", critic=critic)
    images = torch.rand(3, 1, 8, 8)
    expected = 1 - torch.sigmoid(critic(images)).flatten()
    scores = inferer.score(images, torch.nn.Identity())  # identity "reconstructor": D(R(x)) = D(x)
    torch.testing.assert_close(scores.slice_scores.float(), expected.detach(), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="critic"):
        ALOCCInferer(image_size=8, patch_size=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny synthetic BraTS-layout volumes and a datalist (absolute paths) in the comparison's fold layout."""
    root = tmp_path_factory.mktemp("baselines")
    generate_dataset(root / "data", n_cases=8, shape=(40, 40, 16), seed=3, abnormal_fraction=0.5)
    datalist = build_datalist(root / "data", val_fraction=0.25, test_fraction=0.25, seed=0)
    (root / "fold").mkdir()
    (root / "fold" / "datalist.json").write_text(json.dumps(datalist))
    return Fold("fold", root / "fold", root / "fold" / "datalist.json"), datalist


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_one_epoch_and_scores_the_test_cases(tiny, method):
    fold, datalist = tiny
    model = METHODS[method][0]
    torch.set_num_threads(1)
    ckpt = train_model(model, fold, fold.folder / model, TINY)
    assert (ckpt / "model.pt").is_file()
    out = fold.folder / method / "test"
    infer(method, fold, "testing", out, ckpt, TINY, heatmaps=True)
    rows = read_csv(out / "slice_scores.csv")
    assert list(rows[0])[:5] == SLICE_HEADER
    assert {r["case_id"] for r in rows} == {item["case_id"] for item in datalist["testing"]}
    scores = np.array([float(r["score"]) for r in rows])
    assert np.isfinite(scores).all() and np.ptp(scores) > 0
    heatmaps = sorted((out / "heatmaps").glob("*.nii.gz"))
    assert len(heatmaps) == (0 if method == "ocsvm" else len(datalist["testing"]))
    if method == "alocc":
        assert ((scores > 0) & (scores < 1)).all()
    if method == "ocsvm_guided":
        net = LatentAutoEncoder(image_size=32, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
        net.load_state_dict(torch.load(ckpt / "model.pt", weights_only=True))
        assert net.scorer.fitted


def test_alocc_config_runs_from_the_command_line(tiny, tmp_path):
    """configs/alocc.json merged onto train.json and inference.json, as a user types it."""
    fold, datalist = tiny
    tiny_args = ["--image_size", "32", "--patch_size", "8", "--batch_size", "8", "--num_workers", "0",
                 "--network_def#channels", "[8, 16, 32]", "--network_def#strides", "[2, 2]",
                 "--network_def#num_res_units", "1", "--critic_def#channels", "[8, 16]"]

    def bundle(run_id, config, *args):
        cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file",
               f"['configs/{config}','configs/alocc.json']", *tiny_args, "--datalist", str(fold.datalist), *args]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    models = tmp_path / "models"
    bundle("training", "train.json", "--output_dir", str(tmp_path / "train"), "--ckpt_dir", str(models),
           "--max_epochs", "1", "--val_interval", "1")
    bundle("run", "inference.json", "--output_dir", str(tmp_path / "out"), "--ckpt_path", str(models / "model.pt"),
           "--alocc_critic_path", str(models / "checkpoint_best.pt"))
    rows = read_csv(tmp_path / "out" / "scores.csv")
    assert {r["case_id"] for r in rows} == {item["case_id"] for item in datalist["testing"]}
    assert all(0 < float(r["score"]) < 1 for r in rows)
