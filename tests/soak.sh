#!/usr/bin/env bash
# Run the whole suite N times in a row, each time in a new random order, and report every
# failure with the seed that reproduces its order:
#
#   tests/soak.sh 10            # ten runs
#   tests/soak.sh 10 --load     # the same, with a busy loop on the second core all along
#   tests/soak.sh 1 -k journal  # anything after N (and --load) goes to pytest
#
# Reproduce a failing run:  .venv/bin/python -m pytest -p randomly --randomly-seed=SEED
# Exit status: 0 only if every run passed. Logs: $SOAK_DIR (default ./soak-logs), one a run.
set -u
cd "$(dirname "$0")/.."
runs=${1:?usage: tests/soak.sh N [--load] [pytest args...]}
shift
load=""
if [ "${1:-}" = "--load" ]; then
    load=1
    shift
fi
python=${PYTHON:-.venv/bin/python}
logs=${SOAK_DIR:-soak-logs}
mkdir -p "$logs"

busy=""
if [ -n "$load" ]; then
    # One busy loop pinned to the second core (where taskset exists), for the whole soak,
    # bounded in time (4 hours) in case this script is killed before its trap runs.
    pin=""
    if command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -gt 1 ]; then pin="taskset -c 1"; fi
    $pin timeout 14400 "$python" -c "while True: pass" &
    busy=$!
    trap 'kill $busy 2>/dev/null' EXIT
    echo "soak: CPU load: a busy loop (pid $busy) ${pin:+on core 1}"
fi

failed=0
for i in $(seq 1 "$runs"); do
    seed=$(( (RANDOM << 15 | RANDOM) ))
    log="$logs/run-$i-seed-$seed.log"
    start=$(date +%s)
    "$python" -m pytest -q -p no:cacheprovider -p randomly --randomly-seed="$seed" "$@" >"$log" 2>&1
    status=$?
    took=$(( $(date +%s) - start ))
    last=$(grep -E '(passed|failed|error)' "$log" | tail -n 1)
    if [ "$status" -eq 0 ]; then
        line="run $i/$runs seed $seed: ok (${took}s) $last"
    else
        failed=$((failed + 1))
        line="run $i/$runs seed $seed: FAILED (${took}s) $last"
        while IFS= read -r test; do
            line+=$'\n'"    $test  (reproduce: $python -m pytest -p randomly --randomly-seed=$seed)"
        done < <(grep -E '^(FAILED|ERROR) ' "$log")
    fi
    echo "$line"
done

echo
echo "soak: $runs run(s)${load:+ under CPU load}, $((runs - failed)) passed, $failed failed"
[ "$failed" -eq 0 ]
