#!/usr/bin/env bash
# The Unix-pipe form of rollout -> verify -> eval: every stage reads stdin ('-') and writes stdout.
#   bash examples/pipes.sh [MODEL] [DATASET] [LIMIT]
# Defaults build a tiny local model and score it on 8 GSM8K test problems (runs on a CPU in ~30 s).
set -euo pipefail
S2D=${S2D:-s2d}
MODEL=${1:-}
DATASET=${2:-gsm8k}
LIMIT=${3:-8}
if [ -z "$MODEL" ]; then
  MODEL=runs/pipes/tiny
  [ -f "$MODEL/config.json" ] || $S2D make-tiny "$MODEL" >/dev/null
fi
mkdir -p runs/pipes
# sample 2 completions per prompt -> verify in worker processes -> keep a copy -> metrics JSON on stdout
$S2D rollout --model "$MODEL" --dataset "$DATASET" --limit "$LIMIT" --n 2 --max-new-tokens 32 --backend hf --out - \
  | $S2D verify - --out - \
  | tee runs/pipes/verified.jsonl \
  | $S2D eval --rollouts - > runs/pipes/metrics.json
echo "records: $(wc -l < runs/pipes/verified.jsonl)  metrics: runs/pipes/metrics.json" >&2
python3 -c "import json; m = json.load(open('runs/pipes/metrics.json')); print(f\"accuracy {m['accuracy']:.3f} over {m['num_prompts']} prompts x {m['n']}\")"
