#!/bin/bash
# seed 2 of the d-128 warm-up question (P-lr-m, P-lr-o): the proxy's dense twin and the winner at lr 4e-3
# (winner's tables 1.2e-2) with 15 % warm-up (135 steps), then with the default 5.6 % (50 steps)
common="--train.max_steps 900 --train.eval_interval 1000000 --train.eval_batches none --train.checkpoint false --train.seed 2 --train.lr 4e-3"
winner="--model.placement 1,3 --model.peer.shared_pool true --model.peer.balance_weight 0.01 --model.peer.balance_stride 8 --train.expert_weight_decay 1.0 --train.expert_lr 1.2e-2"
OMP_NUM_THREADS=1 ../../.venv/bin/torchpeer train ptb-tiny --model.ffw dense $common --train.warmup_steps 135 --run-dir dense-lr4e-3-wu135-s2 > log_dense-lr4e-3-wu135-s2.txt 2>&1 &
OMP_NUM_THREADS=1 ../../.venv/bin/torchpeer train ptb-tiny $winner $common --train.warmup_steps 135 --run-dir winner-lr4e-3-t1.2e-2-wu135-s2 > log_winner-lr4e-3-t1.2e-2-wu135-s2.txt 2>&1 &
wait
OMP_NUM_THREADS=1 ../../.venv/bin/torchpeer train ptb-tiny --model.ffw dense $common --run-dir dense-lr4e-3-s2 > log_dense-lr4e-3-s2.txt 2>&1 &
OMP_NUM_THREADS=1 ../../.venv/bin/torchpeer train ptb-tiny $winner $common --run-dir winner-lr4e-3-t1.2e-2-s2 > log_winner-lr4e-3-t1.2e-2-s2.txt 2>&1 &
wait
