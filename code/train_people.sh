#!/usr/bin/env bash
# Stage 3, people (pedestrians): the 4th place's fine-tuning command, the same recipe as train_car.sh (BEiT-3 large
# @384 from the official Flickr30k retrieval checkpoint, lr 3e-5, batch 80 per GPU, layer decay 0.85, drop path 0.2,
# DeepSpeed fp16 with activation checkpointing, torchrun) with 15 epochs instead of 17.
#
# Same environment variables as train_car.sh (defaults in brackets) and extra arguments passed on:
#   NGPUS [2]  DATA_PATH [dataset/train]  SPM [model_pth/beit3.spm]
#   FINETUNE [model_pth/beit3_large_patch16_384_f30k_retrieval.pth]  OUTPUT_DIR [code/pt_out_people]
#   LOG_DIR [<output_dir>/tb, also for an --output_dir given as an argument]  MASTER_PORT [29500]  PYTHON [python]
# Relative paths are taken from the repository root.
set -euo pipefail
RECIPE_CATEGORY=people RECIPE_EPOCHS=15 exec bash "$(dirname "$0")/train_car.sh" "$@"
