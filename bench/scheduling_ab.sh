#!/bin/bash
# The search's scheduling, A/B: trials in pairs told together (commit ab2014b) against trials
# started as a worker frees (this checkout), seed 0, the bench's search timed by
# bench/search_timeline.py, alternating, each side warmed by one search first (the numba kernels'
# compilation); then each run's floor (bench/search_bench.py's floor(), 5 rounds) and sampler time.
#
#     bash bench/scheduling_ab.sh [DATA]
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/covid19-image-dataset}
old=${PAIRS_TREE:-/tmp/lungxray-pairs}
[ -d "$old" ] || git worktree add -q "$old" ab2014b
out=$(mktemp -d)
for which in old new; do
  if [ $which = old ]; then pp=$old/src; else pp=$PWD/src; fi
  PYTHONPATH=$pp .venv/bin/python bench/search_timeline.py "$data" --seed 0 --out "$out/warm-$which" > /dev/null
done
for mode in none median; do for which in old new; do
  if [ $which = old ]; then pp=$old/src; else pp=$PWD/src; fi
  echo "== pruner $mode, $which"
  PYTHONPATH=$pp .venv/bin/python bench/search_timeline.py "$data" --seed 0 --pruner $mode --out "$out/$mode-$which" \
    | grep -vE "^(flagged|external|wrote|report) "
done; done
for mode in none median; do for which in old new; do
  .venv/bin/python - "$out/$mode-$which" "$mode $which" <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, "bench")
import search_bench as sb
run = Path(sys.argv[1])
search = json.loads((run / "run.json").read_text())["timings"]["tune_s"]
trials = json.loads((run / "trials.json").read_text())
f = sb.floor(run, rounds=5)
draws = [t.get("sampler_s", 0) for t in trials]
print(f"{sys.argv[2]}: search {search:.1f} s, floor {f['floor_s']:.1f} s ({min(f['round_floors_s']):.1f}-"
      f"{max(f['round_floors_s']):.1f}), search / floor {search / f['floor_s']:.2f}, {f['epochs']} epochs, "
      f"sampler {sum(draws):.1f} s (draws {min(draws):.2f}-{max(draws):.2f} s)")
PY
done; done
