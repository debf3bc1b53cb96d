#!/usr/bin/env bash
# One device command of the routing research: (train the BPE-16k tokenizer if it is not carried),
# then benchmarks/routing_runs.py over one spec; results and logs to $OUT.
#   bash benchmarks/routing_device.sh SPEC TAG PARALLEL START_BY TIMEOUT [CORPUS]
# Run from the folder that holds torchpeer/ (a snapshot of the tree); CORPUS (default .corpus) holds
# the corpus copy (and bpe16k/ once trained).
set -u
spec=$1 tag=$2 parallel=$3 start_by=$4 timeout=$5 corpus=${6:-.corpus}
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TQDM_DISABLE=1
work=/tmp/routing_$tag
mkdir -p "$work"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv -l 5 > "$work/smi.csv" 2>&1 &
smi=$!
if [ ! -f "$corpus/bpe16k/vocab.json" ] && [ ! -f "$corpus/bpe16k/tokenizer.json" ]; then
  t0=$(date +%s)
  python -c "from torchpeer.data import DataConfig as C, load_tokenizer as L; \
L(C(train='$corpus/*/train.jsonl.xz', tokenizer='bpe', vocab_size=16384)).save('$corpus/bpe16k')"
  echo "bpe trained in $(( $(date +%s) - t0 )) s"
fi
tar czf "$OUT/bpe16k.tgz" -C "$corpus" bpe16k
python benchmarks/routing_runs.py --spec "$spec" --out "$work" --runs-dir "/tmp/runs_$tag" --parallel "$parallel" \
  --start-by "$start_by" --timeout "$timeout" --corpus "$corpus" --tag "$tag"
rc=$?
kill $smi
cp "$work/routing_$tag.json" "$work/routing_$tag.md" "$OUT/" 2>/dev/null
tar czf "$OUT/logs_$tag.tgz" -C "$work" .
exit $rc
