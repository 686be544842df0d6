#!/usr/bin/env bash
# Issue 16's quality bar on a machine with many cores and, optionally, a GPU
# (experiments/bench_search_pool.py: one whole search per process), in two stages:
#
# 1. selection, on held-out seeds 5-9: the ddpg candidates (CANDIDATES, default: AMC's
#    defaults, fill_budget, fill_budget with the uniform warm-up prior), 300 evaluations, FLOPs 0.5 and 0.25, no fine-tune. The
#    candidate with the highest mean test accuracy (no fine-tune) over every row is the one
#    the quality bar runs as `ddpg`: chosen by rule, on seeds the quality bar never uses.
# 2. the quality bar, on seeds 0-4: ddpg (the chosen candidate), random, evolution, netadapt,
#    sensitivity, uniform, global; 300 evaluations; each best policy fine-tuned the same way
#    (FT_EPOCHS, default 1, capped at FT_BATCHES batches, default 150: the benchmark's).
#
#   OUT=/tmp/qbar SECONDS_SELECT=240 SECONDS_TOTAL=500 bash experiments/quality_bar_pool.sh \
#       --set device=cuda --cpu-fallback
#
# Extra arguments go to both stages (task overrides: --set KEY=VALUE). Rows land in
# $OUT/select.jsonl and $OUT/qbar.jsonl (tables beside them); a rerun resumes both. Each stage
# stops handing out searches at its deadline (SECONDS_SELECT, SECONDS_TOTAL from the start) and
# lets the running ones finish: under a hard time limit, wrap the script in `timeout` and rebuild
# the tables with `bench_search.py --out $OUT/qbar --table-only`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-experiments/results/quality_bar_pool}
PY=${PY:-python3}
START=$(date +%s)
mkdir -p "$OUT"
COMMON=(--processes "${PROCESSES:-16}" --budgets flops=0.5 flops=0.25 --evaluations 300
        --set eval.search_images=1000 "$@")
CANDIDATES=(${CANDIDATES:-ddpg-amc ddpg-fill ddpg-fill-prior})
# DDPG_OPTS: options every candidate shares (e.g. warmup_episodes=2 for a smoke run)
X=${DDPG_OPTS:+$DDPG_OPTS,}
VARIANTS=(--variant "ddpg-amc=ddpg:${DDPG_OPTS:-}"
          --variant "ddpg-fill=ddpg:${X}fill_budget=true"
          --variant "ddpg-prior=ddpg:${X}warmup_prior=uniform"
          --variant "ddpg-fill-prior=ddpg:${X}fill_budget=true,warmup_prior=uniform")

"$PY" experiments/bench_search_pool.py "${COMMON[@]}" --seeds 5 6 7 8 9 \
    --searchers "${CANDIDATES[@]}" "${VARIANTS[@]}" --finetune-epochs 0 \
    --deadline-at $((START + ${SECONDS_SELECT:-240})) --agent ddpg-amc --out "$OUT/select"

CHOICE=$("$PY" - "$OUT/select.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
by = {}
for r in rows:
    by.setdefault(r["searcher"], []).append(r)
best = max(by, key=lambda n: statistics.mean(r["test_before"] for r in by[n]))
for name, rs in by.items():
    mean = statistics.mean(r["test_before"] for r in rs)
    print(f"# {name}: {len(rs)} rows, mean test accuracy (no FT) {100 * mean:.2f}%",
          file=sys.stderr)
print(f"# chosen: {best}", file=sys.stderr)
opts = by[best][0]["options"]
print(",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in opts.items()))
EOF
)
echo "# the quality bar's ddpg: options '$CHOICE'"

"$PY" experiments/bench_search_pool.py "${COMMON[@]}" --seeds 0 1 2 3 4 \
    --searchers ddpg random evolution netadapt sensitivity uniform global \
    --variant "ddpg=ddpg:$CHOICE" --finetune-epochs "${FT_EPOCHS:-1}" \
    --finetune-batches "${FT_BATCHES:-150}" \
    --deadline-at $((START + ${SECONDS_TOTAL:-500})) --out "$OUT/qbar"
