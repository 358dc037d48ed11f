#!/usr/bin/env bash
# Stage 5: the submission. Runs code/infer.py with the paths below; override any of them from the environment,
# e.g.  NGPU=2 CKPT_CAR=code/pt_out_car/checkpoint-16 bash code/infer.sh --eval
# CKPT_CAR / CKPT_PEOPLE may list several checkpoints separated by spaces: an ensemble (mean cosine similarity);
# for paths that contain spaces call code/infer.py directly.
# Extra arguments are passed through to infer.py. Relative paths are taken from the repository root (the script
# changes into it). INPUT_SIZE is empty by default: the model's own size (e.g. 384 for beit3_large_patch16_384).
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root: the default paths are relative to it

DATA_PATH=${DATA_PATH:-dataset/test}
SPM=${SPM:-model_pth/beit3.spm}
CKPT_CAR=${CKPT_CAR:-code/pt_out_car/checkpoint-best}
CKPT_PEOPLE=${CKPT_PEOPLE:-code/pt_out_people/checkpoint-best}
MODEL=${MODEL:-beit3_large_patch16_384}
INPUT_SIZE=${INPUT_SIZE:-}
NGPU=${NGPU:-1}
OUTPUT_DIR=${OUTPUT_DIR:-code}
PYTHON=${PYTHON:-python}

read -r -a CARS <<< "$CKPT_CAR"
read -r -a PEOPLE <<< "$CKPT_PEOPLE"
ARGS=(
    --model "$MODEL"
    ${INPUT_SIZE:+--input_size "$INPUT_SIZE"}
    --task flickr30k
    --batch_size 64
    --sentencepiece_model "$SPM"
    --finetune_car "${CARS[@]}"
    --finetune_people "${PEOPLE[@]}"
    --data_path "$DATA_PATH"
    --output_dir "$OUTPUT_DIR"
)

if [ "$NGPU" -gt 1 ]; then
    exec "$PYTHON" -m torch.distributed.run --nproc_per_node="$NGPU" code/infer.py "${ARGS[@]}" --dist_eval "$@"
else
    exec "$PYTHON" code/infer.py "${ARGS[@]}" "$@"
fi
