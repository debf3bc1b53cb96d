#!/bin/bash
# Twenty-second session (campaign.md Batch 19, P-lr-q / P-lr-r): the proxy's PKM (128^2 slots, h 8, k 32, d_key 128)
# and token-choice MoE (128 experts, top-1, capacity 1.25) at d 128, lr 4e-3, with 5.6 % (50 steps) and 15 %
# (135 steps) warm-up: the proxy's prior for P-lr-n (does each family gain alike from a longer warm-up?).
# Usage: bash warmup128_pkm_moe.sh SEED   (run: 0, then 1; run folders end in -sSEED)
seed=${1:?give the seed, e.g. 0}
common="--train.max_steps 900 --train.eval_interval 1000000 --train.eval_batches none --train.checkpoint false --train.seed $seed --train.lr 4e-3"
pkm="--model.ffw pkm --model.pkm.n_keys 128 --model.pkm.heads 8 --model.pkm.top_k 32 --model.pkm.d_key 128"
moe="--model.ffw moe --model.moe.n_experts 128 --model.moe.routing token_choice --model.moe.top_k 1 --model.moe.capacity_factor 1.25"
run() { OMP_NUM_THREADS=1 ../../.venv/bin/torchpeer train ptb-tiny $2 $common $3 --run-dir $1 > log_$1.txt 2>&1; }
run pkm128-lr4e-3-s$seed "$pkm" "" & run pkm128-lr4e-3-wu135-s$seed "$pkm" "--train.warmup_steps 135" & wait
run moe128-lr4e-3-s$seed "$moe" "" & run moe128-lr4e-3-wu135-s$seed "$moe" "--train.warmup_steps 135" & wait
