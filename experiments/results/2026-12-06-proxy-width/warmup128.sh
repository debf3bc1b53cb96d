#!/bin/bash
# Twenty-first session (campaign.md Batch 18, P-lr-m): the proxy's d 128 dense twin and issue 18's winner
# with 15 % warm-up (135 of 900 steps), seed 0, at base lr 4e-3 and then 8e-3 (winner's tables 3x).
common="--train.max_steps 900 --train.eval_interval 1000000 --train.eval_batches none --train.checkpoint false --train.seed 0 --train.warmup_steps 135"
winner="--model.placement 1,3 --model.peer.shared_pool true --model.peer.balance_weight 0.01 --model.peer.balance_stride 8 --train.expert_weight_decay 1.0"
dense() { OMP_NUM_THREADS=1 ../../.venv/bin/torchpeer train ptb-tiny --model.ffw dense $common --train.lr $1 --run-dir dense-lr$1-wu135-s0 > log_dense-lr$1-wu135-s0.txt 2>&1; }
win() { OMP_NUM_THREADS=1 ../../.venv/bin/torchpeer train ptb-tiny $winner $common --train.lr $1 --train.expert_lr $2 --run-dir winner-lr$1-t$2-wu135-s0 > log_winner-lr$1-t$2-wu135-s0.txt 2>&1; }
dense 4e-3 & win 4e-3 1.2e-2 & wait
dense 8e-3 & win 8e-3 2.4e-2 & wait
