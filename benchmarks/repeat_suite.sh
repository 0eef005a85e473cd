#!/usr/bin/env bash
# Run the README's test command N times in a row from a clean clone, in a fresh virtual
# environment, and count the crashes (issue 11, defect 6: one full run in eight once ended
# with "Fatal Python error: Aborted").
#
#   benchmarks/repeat_suite.sh N [REF]
#
# REF (default HEAD) is cloned from this repository into a new temporary directory; the
# venv is made there with python3 -m venv and the README's install step runs once
#   python3 -m pip install -e ".[test,ray,hf]"
# (a rebuild per run would only repeat the compile); each run is then the README's
#   python3 -m pytest
# with its output kept in $OUT/run-<i>.log (OUT defaults to that directory). A run counts
# as a crash when pytest died from a signal (exit status >= 128, or a "Fatal Python error"
# or "Segmentation fault" in its output); a run whose tests fail without a crash is counted
# apart. Prints one line per run and a summary; exits 1 when any run crashed.
# The full suite takes minutes on a small machine: N=20 is a long job.
set -uo pipefail

n=${1:?usage: benchmarks/repeat_suite.sh N [REF]}
ref=${2:-HEAD}
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
work=$(mktemp -d "${TMPDIR:-/tmp}/fq-repeat.XXXXXX")
out=${OUT:-$work}
mkdir -p "$out"

git clone -q --no-local "$repo" "$work/src"
git -C "$work/src" checkout -q "$ref"
echo "clone of $(git -C "$work/src" rev-parse --short HEAD) in $work/src; logs in $out"
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
python -m pip install -q --upgrade pip
cd "$work/src"
python3 -m pip install -q -e ".[test,ray,hf]" > "$out/install.log" 2>&1 || {
    echo "the install failed: $out/install.log"; exit 2; }

crashes=0 failures=0 passes=0
for i in $(seq 1 "$n"); do
    log="$out/run-$i.log"
    start=$(date +%s)
    python3 -m pytest > "$log" 2>&1
    status=$?
    seconds=$(( $(date +%s) - start ))
    if [ "$status" -ge 128 ] || grep -q -E "Fatal Python error|Segmentation fault" "$log"; then
        crashes=$((crashes + 1))
        verdict="CRASH (exit $status): $(grep -m1 -E 'Fatal Python error|Segmentation fault' "$log")"
    elif [ "$status" -ne 0 ]; then
        failures=$((failures + 1))
        verdict="failed (exit $status): $(grep -E '^(FAILED|ERROR) ' "$log" | head -3 | tr '\n' ' ')"
    else
        passes=$((passes + 1))
        verdict="passed: $(tail -n 1 "$log")"
    fi
    echo "run $i/$n ${seconds}s: $verdict"
done
echo "summary: $n runs, $passes passed, $failures failed without a crash, $crashes crashed"
[ "$crashes" -eq 0 ]
