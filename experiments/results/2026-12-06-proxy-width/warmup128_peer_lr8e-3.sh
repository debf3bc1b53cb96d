#!/bin/bash
# the proxy's PEER model (ptb-tiny as shipped) at d 128, lr 8e-3: 15 % warm-up (135 steps) on seed 0
# (its 5.6 % run is p128-lr8e-3), then both warm-ups on seed 1 (P-wu-d, campaign.md Batch 20)
common="--train.max_steps 900 --train.eval_interval 1000000 --train.eval_batches none --train.checkpoint false --train.lr 8e-3"
run() { OMP_NUM_THREADS=1 ../../.venv/bin/torchpeer train ptb-tiny $common "$@"; }
run --train.seed 0 --train.warmup_steps 135 --run-dir p128-lr8e-3-wu135 > log_p128-lr8e-3-wu135.txt 2>&1 &
run --train.seed 1 --run-dir p128-lr8e-3-s1 > log_p128-lr8e-3-s1.txt 2>&1 &
wait
run --train.seed 1 --train.warmup_steps 135 --run-dir p128-lr8e-3-wu135-s1 > log_p128-lr8e-3-wu135-s1.txt 2>&1
