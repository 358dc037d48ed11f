#!/usr/bin/env bash
# The GPU benchmark of README "Performance": BEiT-3 large@384, ours vs the official implementation (torchscale),
# side by side in one process. Needs torchscale/fairscale (requirements-oracle.txt); on a machine without network,
# bring them as wheels in .whl/ (README "Performance"). Usage: OUT=results_dir bash tools/gpu_bench.sh
# Options (environment): SETTINGS (benchmark settings), BENCH_FLAGS (default --compile), SDPA (default "default").
# The attention-kernel comparison: SETTINGS="attention train" SDPA="default cudnn" BENCH_FLAGS="--compile \
#   --reference none" OUT=... bash tools/gpu_bench.sh
# The fused FFN kernel, alone and in the training step: SETTINGS="ffn train" BENCH_FLAGS="--compile --fused_ffn \
#   --reference none" OUT=... bash tools/gpu_bench.sh
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
if ! python -c "import torchscale, fairscale" 2>/dev/null; then
  SITE=$(mktemp -d); pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl; export PYTHONPATH="$SITE:${PYTHONPATH:-}"
fi
python -c "import traffic_retrieval" 2>/dev/null || export PYTHONPATH="$PWD/code:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
M="--model beit3_large_patch16_384 --batch_size 80 --device cuda --precision bf16 --encode_batch 256 --text_batch 4096"
S=${SETTINGS:-train train_ckpt encode_image encode_text infer_stage}
# SDPA: one or more --sdpa preferences, each benchmarked in its own process (e.g. SDPA="default cudnn")
for sdpa in ${SDPA:-default}; do
  [ -n "${S// /}" ] || break  # only the attention setting was asked for, and it has run
  python code/benchmark.py $M ${BENCH_FLAGS:---compile} --sdpa "$sdpa" --settings $S 2>"$OUT/bench_$sdpa.log" \
    | tee "$OUT/bench_$sdpa.jsonl"
  tail -n 5 "$OUT/bench_$sdpa.log"
  S=${S//attention/}  # the attention setting compares every preference in one process: once is enough
done
