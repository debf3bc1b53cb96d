#!/bin/bash
# Twenty-second session (P-lr-s): is 15 % enough? dense and the winner at d 128, lr 4e-3 (tables 1.2e-2), seed 0,
# with 30 % warm-up (270 of 900 steps), beside their 5.6 % and 15 % runs.
while pgrep -f warmup128_pkm_moe_s1.sh > /dev/null; do sleep 20; done
common="--train.max_steps 900 --train.eval_interval 1000000 --train.eval_batches none --train.checkpoint false --train.seed 0 --train.lr 4e-3 --train.warmup_steps 270"
winner="--model.placement 1,3 --model.peer.shared_pool true --model.peer.balance_weight 0.01 --model.peer.balance_stride 8 --train.expert_weight_decay 1.0 --train.expert_lr 1.2e-2"
OMP_NUM_THREADS=1 ../../.venv/bin/torchpeer train ptb-tiny --model.ffw dense $common --run-dir dense-lr4e-3-wu270-s0 > log_dense-lr4e-3-wu270-s0.txt 2>&1 &
OMP_NUM_THREADS=1 ../../.venv/bin/torchpeer train ptb-tiny $winner $common --run-dir winner-lr4e-3-t1.2e-2-wu270-s0 > log_winner-lr4e-3-t1.2e-2-wu270-s0.txt 2>&1 &
wait
