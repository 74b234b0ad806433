#!/usr/bin/env bash
# The main job on the embedded default: generate a small synthetic FLAIR dataset in the BraTS layout, train the
# masked reconstructor + PatchGAN on its normal slices, score the held-out cases with targeted patch ranking,
# evaluate, and print where the scores and heatmaps are. CPU only; a few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
. .venv/bin/activate
export PYTHONUNBUFFERED=1
python -m scripts.data.synthetic --output demo_data/synthetic --cases 20 --seed 0
python -m scripts.data.datalist --dataset-dir demo_data/synthetic --output demo_data/datalist.json --seed 0 \
    --val-fraction 0.25 --test-fraction 0.25
python -m monai.bundle run training --config_file "['configs/train.json','configs/demo.json']"
python -m monai.bundle run run --config_file "['configs/inference.json','configs/demo.json']"
# normal validation scores fix the operating threshold (no test label is used for it)
python -m monai.bundle run run --config_file "['configs/inference.json','configs/demo.json']" \
    --datalist_split validation --output_dir runs/demo/validation --write_heatmaps False
python -m scripts.evaluation --output-dir runs/demo --eval-dir runs/demo/evaluation \
    --validation-output-dir runs/demo/validation --datalist demo_data/datalist.json
cat runs/demo/evaluation/metrics.md
overlay=$(ls runs/demo/overlays/*_top_slices.png | head -n 1)
cat <<MSG

Done. Outputs of the demo run:
  model weights     runs/demo/models/model.pt
  volume scores     runs/demo/scores.csv
  slice scores      runs/demo/slice_scores.csv
  heatmaps (NIfTI)  runs/demo/heatmaps/
  overlays          runs/demo/overlays/ (e.g. $overlay: the most anomalous slices, heatmap over the image)
  evaluation        runs/demo/evaluation/metrics.md, roc.png, score_distribution.png
MSG
