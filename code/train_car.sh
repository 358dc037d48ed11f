#!/usr/bin/env bash
# Stage 3, cars: the 4th place's fine-tuning command (BEiT-3 large @384 from the official Flickr30k retrieval
# checkpoint, 17 epochs, lr 3e-5, batch 80 per GPU, layer decay 0.85, drop path 0.2, DeepSpeed fp16 with activation
# checkpointing), launched with torchrun instead of the deprecated torch.distributed.launch.
#
# Paths and the GPU count come from environment variables (defaults in brackets); extra arguments are passed on and
# override the recipe's flags (argparse keeps the last value), e.g. `bash code/train_car.sh --auto_resume`.
#   NGPUS [2]  DATA_PATH [dataset/train]  SPM [model_pth/beit3.spm]
#   FINETUNE [model_pth/beit3_large_patch16_384_f30k_retrieval.pth]  OUTPUT_DIR [code/pt_out_car]
#   LOG_DIR [<output_dir>/tb, also for an --output_dir given as an argument]  MASTER_PORT [29500]  PYTHON [python]
# Relative paths are taken from the repository root (the script changes into it).
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root: the default paths are relative to it

# The recipe lives here once; train_people.sh calls this script with its two differences (category, epochs).
CATEGORY=${RECIPE_CATEGORY:-car}
EPOCHS=${RECIPE_EPOCHS:-17}
NGPUS=${NGPUS:-2}
DATA_PATH=${DATA_PATH:-dataset/train}
SPM=${SPM:-model_pth/beit3.spm}
FINETUNE=${FINETUNE:-model_pth/beit3_large_patch16_384_f30k_retrieval.pth}
OUTPUT_DIR=${OUTPUT_DIR:-code/pt_out_${CATEGORY}}
LOG_DIR=${LOG_DIR:-}  # empty: the Python default <output_dir>/tb, so events stay beside the checkpoints
PYTHON=${PYTHON:-python}

exec "$PYTHON" -m torch.distributed.run --nproc_per_node="$NGPUS" --master_port="${MASTER_PORT:-29500}" \
    code/run_beit3_finetuning.py \
    --model beit3_large_patch16_384 --input_size 384 --task flickr30k \
    --batch_size 80 --layer_decay 0.85 --lr 3e-5 --epochs "$EPOCHS" --warmup_epochs 3 --drop_path 0.2 \
    --sentencepiece_model "$SPM" --finetune "$FINETUNE" --data_path "$DATA_PATH" \
    --output_dir "$OUTPUT_DIR" ${LOG_DIR:+--log_dir "$LOG_DIR"} --weight_decay 0.05 --seed 42 --save_ckpt_freq 5 \
    --enable_deepspeed --checkpoint_activations --category "$CATEGORY" "$@"
