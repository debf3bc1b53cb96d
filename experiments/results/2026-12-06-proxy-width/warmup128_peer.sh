#!/bin/bash
# after warmup128.sh: the proxy's paper-faithful PEER model (ptb-tiny as shipped) at d 128, lr 4e-3, 15 % warm-up, seed 0
while pgrep -f warmup128.sh > /dev/null; do sleep 10; done
OMP_NUM_THREADS=1 ../../.venv/bin/torchpeer train ptb-tiny --train.max_steps 900 --train.eval_interval 1000000 --train.eval_batches none \
  --train.checkpoint false --train.seed 0 --train.warmup_steps 135 --train.lr 4e-3 --run-dir p128-lr4e-3-wu135 > log_p128-lr4e-3-wu135.txt 2>&1
