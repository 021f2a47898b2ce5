#!/usr/bin/env bash
# Same-run comparison of pdserve with another OpenAI-compatible server (e.g. llama.cpp's
# llama-server): the same prompts, load and seed against each, in one script run, so the ratios
# hold on a noisy machine. Servers are started by you; this script only measures.
#
#   PDSERVE_URL=http://127.0.0.1:8000 LLAMACPP_URL=http://127.0.0.1:8080 \
#     scripts/bench_compare.sh --num-prompts 100 --request-rate 4
#
# Environment:
#   PDSERVE_URL   pdserve's base URL (default http://127.0.0.1:8000)
#   LLAMACPP_URL  the other server's base URL (optional: without it only pdserve is measured)
#   OTHER_LABEL   the other server's name in the table (default llama.cpp)
#   ROUNDS        how many times to alternate the two runs (default 1); every round is kept
#   OUT_DIR       where results and plots go (default bench-results/compare-<date>)
#   PLOTS         1 (default) writes PNG plots next to each result; 0 skips them
#   TOKENIZER     an HF folder both runs count tokens with (recommended when the other server
#                 does not report usage in its stream)
# Extra arguments go to every `pdserve bench serve` run (defaults below come first).
set -euo pipefail
cd "$(dirname "$0")/.."

PDSERVE_URL=${PDSERVE_URL:-http://127.0.0.1:8000}
LLAMACPP_URL=${LLAMACPP_URL:-}
OTHER_LABEL=${OTHER_LABEL:-llama.cpp}
ROUNDS=${ROUNDS:-1}
OUT_DIR=${OUT_DIR:-bench-results/compare-$(date +%Y%m%d-%H%M%S)}
PDSERVE=${PDSERVE:-.venv/bin/pdserve}
PYTHON=${PYTHON:-.venv/bin/python}

defaults=(--num-prompts 50 --random-input-len 128 --random-output-len 64
          --request-rate 4 --ignore-eos --seed 0 --disable-tqdm)
if [[ -n "${TOKENIZER:-}" ]]; then
  defaults+=(--tokenizer "$TOKENIZER")
fi
mkdir -p "$OUT_DIR"

run_one() {  # label url round [extra bench flags...]
  local label=$1 url=$2 round=$3
  shift 3
  local name="$label-r$round"
  echo "== $label ($url), round $round" >&2
  local plot=()
  if [[ "${PLOTS:-1}" == 1 ]]; then plot=(--plot "$OUT_DIR/$name-plots"); fi
  "$PDSERVE" bench serve --base-url "$url" "${defaults[@]}" "$@" "${plot[@]}" \
    --save-result --result-dir "$OUT_DIR" --result-filename "$name.json" >"$OUT_DIR/$name.log" 2>&1 \
    || { echo "bench against $url failed; see $OUT_DIR/$name.log" >&2; tail -5 "$OUT_DIR/$name.log" >&2; exit 1; }
}

files=() labels=()
for ((round = 1; round <= ROUNDS; round++)); do
  # Alternate who goes first so neither always runs on a warmer or colder machine.
  order=(pdserve)
  if [[ -n "$LLAMACPP_URL" ]]; then
    if ((round % 2)); then order=(pdserve other); else order=(other pdserve); fi
  fi
  for who in "${order[@]}"; do
    if [[ "$who" == pdserve ]]; then
      run_one pdserve "$PDSERVE_URL" "$round" "$@"
    else
      run_one "$OTHER_LABEL" "$LLAMACPP_URL" "$round" "$@"
    fi
  done
  files+=("$OUT_DIR/pdserve-r$round.json") labels+=("pdserve-r$round")
  if [[ -n "$LLAMACPP_URL" ]]; then
    files+=("$OUT_DIR/$OTHER_LABEL-r$round.json") labels+=("$OTHER_LABEL-r$round")
  fi
done

(IFS=,; "$PYTHON" -m pdserve.bench.compare "${files[@]}" --labels "${labels[*]}") | tee "$OUT_DIR/compare.txt"
echo "results, logs and plots: $OUT_DIR" >&2
