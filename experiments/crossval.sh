#!/usr/bin/env bash
# Patient-level cross-validation of the Patch-GAN bundle on a labelled folder, with the scoring variants of
# docs/results.md. Every number there comes from this script.
#   bash experiments/crossval.sh brats  ../shared/data/brats2013  runs/cv_brats
#   bash experiments/crossval.sh isic   ../shared/data/isic2016   runs/cv_isic
# Settings are scaled for 2 CPU cores (128 px FLAIR / 64 px dermoscopy, small channels): see size below.
# LESION_FREE=1 trains with configs/lesion_free.json (lesion pixels carry no loss; lesion slices/images join training).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
modality=$1 data=$2 out=$3 folds=${FOLDS:-4} seed=${SEED:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # two jobs side by side on 2 cores thrash with more threads
mkdir -p "$out"
train_extra=""
if [ "${LESION_FREE:-0}" = 1 ]; then train_extra=",'configs/lesion_free.json'"; fi
if [ "$modality" = brats ]; then
    configs="'configs/train.json'" infer="'configs/inference.json'"
    size=(--image_size 128 --patch_size 16 --max_epochs "${EPOCHS:-40}")
    datalist_args=(--dataset-dir "$data")
else
    configs="'configs/train.json','configs/dermoscopy.json'" infer="'configs/inference.json','configs/dermoscopy.json'"
    size=(--image_size 64 --patch_size 8 --max_epochs "${EPOCHS:-20}")
    datalist_args=(--dataset-dir "$data/train" --labels-csv "$data/train_labels.csv" --masks-dir "$data/train_masks")
fi
net=(--network_def#channels "[16, 32, 64, 128, 256]" --critic_def#channels 32 --num_workers 0)
for fold in $(seq 0 $((folds - 1))); do
    dir="$out/fold$fold"
    python -m scripts.data.datalist "${datalist_args[@]}" --folds "$folds" --fold "$fold" --seed "$seed" --output "$dir/datalist.json"
    if [ ! -f "$dir/models/model.pt" ]; then  # a rerun only re-scores the models it already trained
        python -m monai.bundle run training --config_file "[$configs$train_extra]" "${size[@]}" "${net[@]}" \
            --batch_size 16 --learning_rate 0.0005 --val_interval 5 --seed "$seed" \
            --datalist "$dir/datalist.json" --output_dir "$dir/train" --ckpt_dir "$dir/models"
    else  # refit the normal statistics with the current score-map code
        python -m monai.bundle run calibrate --config_file "[$configs]" "${size[@]}" "${net[@]}" \
            --datalist "$dir/datalist.json" --output_dir "$dir/train" --ckpt_dir "$dir/models"
    fi
    common=("${size[@]}" "${net[@]}" --datalist "$dir/datalist.json" --ckpt_path "$dir/models/model.pt")
    variant() {  # name, extra inference overrides: test split and normal validation split (for thresholds)
        local name=$1; shift
        python -m monai.bundle run run --config_file "[$infer]" "${common[@]}" --output_dir "$dir/$name" "$@"
        python -m monai.bundle run run --config_file "[$infer]" "${common[@]}" --output_dir "$dir/$name/validation" \
            --datalist_split validation --write_heatmaps False --overlay_slices 0 "$@"
    }
    variant ranking --score_maps "['squared']"
    variant no_ranking --score_maps "['squared']" --ranking False --overlay_slices 0
    variant unmasked --score_maps "['squared']" --test_input image --overlay_slices 0
    variant ssim_no_ranking --score_maps "['ssim']" --ranking False --overlay_slices 0
    variant ssim --score_maps "['ssim']" --overlay_slices 0
    variant critic --score_maps "['critic']" --overlay_slices 0
    variant zmap --score_maps "['squared']" --normal_stats "$dir/models/normal_stats.pt" --overlay_slices 0
    variant zmap_critic --score_maps "['squared', 'critic']" --normal_stats "$dir/models/normal_stats.pt" --overlay_slices 0
    variant feature --score_maps "['feature']" --overlay_slices 0
    variant zmap_feature --score_maps "['squared', 'feature']" --normal_stats "$dir/models/normal_stats.pt" --overlay_slices 0
done
python -m experiments.cv_summary "$out"
