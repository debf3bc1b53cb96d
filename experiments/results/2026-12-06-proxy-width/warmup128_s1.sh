#!/bin/bash
# seed 1 of warmup128.sh's lr-4e-3 pair (P-lr-m): the proxy's dense twin and the winner, 15 % warm-up
common="--train.max_steps 900 --train.eval_interval 1000000 --train.eval_batches none --train.checkpoint false --train.seed 1 --train.warmup_steps 135"
winner="--model.placement 1,3 --model.peer.shared_pool true --model.peer.balance_weight 0.01 --model.peer.balance_stride 8 --train.expert_weight_decay 1.0"
OMP_NUM_THREADS=1 ../../.venv/bin/torchpeer train ptb-tiny --model.ffw dense $common --train.lr 4e-3 --run-dir dense-lr4e-3-wu135-s1 > log_dense-lr4e-3-wu135-s1.txt 2>&1 &
OMP_NUM_THREADS=1 ../../.venv/bin/torchpeer train ptb-tiny $winner $common --train.lr 4e-3 --train.expert_lr 1.2e-2 --run-dir winner-lr4e-3-t1.2e-2-wu135-s1 > log_winner-lr4e-3-t1.2e-2-wu135-s1.txt 2>&1 &
wait
