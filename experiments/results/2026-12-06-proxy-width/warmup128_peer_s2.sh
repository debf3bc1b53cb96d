#!/bin/bash
# seed 2 of the proxy's PEER model (ptb-tiny as shipped) at d 128, lr 4e-3, with 5.6 % (50 steps, the default) and 15 % warm-up
common="--train.max_steps 900 --train.eval_interval 1000000 --train.eval_batches none --train.checkpoint false --train.seed 2 --train.lr 4e-3"
OMP_NUM_THREADS=1 ../../.venv/bin/torchpeer train ptb-tiny $common --run-dir p128-lr4e-3-s2 > log_p128-lr4e-3-s2.txt 2>&1 &
OMP_NUM_THREADS=1 ../../.venv/bin/torchpeer train ptb-tiny $common --train.warmup_steps 135 --run-dir p128-lr4e-3-wu135-s2 > log_p128-lr4e-3-wu135-s2.txt 2>&1 &
wait
