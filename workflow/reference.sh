#!/usr/bin/env bash
# The reference runs (config/reference.yaml) in the background, in a folder outside the work tree that outlives a
# working session: `make reference-start` (docs/reference.md).
#
#   workflow/reference.sh start    clone this project at the training commit into $REFERENCE_DIR/code (once), install
#                                  it, bring in the checkpoints committed under results/reference/ that the folder
#                                  lacks, and train in the background: seed 0 of every method, then seed 1, then 2
#   workflow/reference.sh status   what is running, and each run's last finished epoch
#
# The training code is the commit in results/reference/TRAINING_COMMIT (written by the first start), so that editing
# this checkout never changes how a run of the set goes on; the set trains with that clone's own .venv.
set -euo pipefail
HERE="${HERE:-$(cd "$(dirname "$0")/.." && pwd)}"  # the project checkout (the driver's copy is told it)
cd "$HERE"
REFERENCE_DIR="${REFERENCE_DIR:-$(cd .. && pwd)/har-reference}"
CODE="$REFERENCE_DIR/code"
PIN="results/reference/TRAINING_COMMIT"
METHODS=(ce_drw har_ce_drw ldam_drw har_ldam_drw)
SEEDS=(0 1 2)
SPLIT=cifar10-r100

status() {
    if [ -f "$REFERENCE_DIR/driver.pid" ] && kill -0 "$(cat "$REFERENCE_DIR/driver.pid")" 2>/dev/null; then
        echo "running (driver pid $(cat "$REFERENCE_DIR/driver.pid")), log $REFERENCE_DIR/driver.log"
    else
        echo "not running"
    fi
    for seed in "${SEEDS[@]}"; do
        for method in "${METHODS[@]}"; do
            run="$CODE/results/runs/$SPLIT/$method/seed$seed"
            epochs=$( [ -f "$run/metrics.jsonl" ] && wc -l < "$run/metrics.jsonl" || echo 0)
            done_mark=$( [ -f "$run/eval/test.json" ] && echo "evaluated" || echo "")
            echo "  $method seed $seed: $epochs epochs $done_mark"
        done
    done
}

start() {
    if [ -f "$REFERENCE_DIR/driver.pid" ] && kill -0 "$(cat "$REFERENCE_DIR/driver.pid")" 2>/dev/null; then
        echo "already running: driver pid $(cat "$REFERENCE_DIR/driver.pid")"; exit 0
    fi
    mkdir -p "$REFERENCE_DIR"
    if [ ! -f "$PIN" ]; then
        git diff --quiet HEAD -- har workflow config pyproject.toml || {
            echo "commit har/, workflow/ and config/ first: the set trains with a committed version" >&2; exit 1; }
        mkdir -p "$(dirname "$PIN")"
        git rev-parse HEAD > "$PIN"
        echo "pinned the training code at $(cat "$PIN") ($PIN: commit it)"
    fi
    commit="$(cat "$PIN")"
    if [ ! -d "$CODE/.git" ]; then
        git clone -q "$HERE" "$CODE"
    fi
    git -C "$CODE" fetch -q "$HERE" "$commit" 2>/dev/null || git -C "$CODE" fetch -q "$HERE"
    git -C "$CODE" checkout -q --detach "$commit"
    make -C "$CODE" install PYTHON="${PYTHON:-python3}"
    .venv/bin/python -m har.pipeline.reference restore --into "$CODE"
    # the driver runs a copy of this script: bash reads a script as it goes, so editing this one would change it
    cp "$HERE/workflow/reference.sh" "$REFERENCE_DIR/driver.sh"
    HERE="$HERE" nohup bash "$REFERENCE_DIR/driver.sh" drive > "$REFERENCE_DIR/driver.log" 2>&1 &
    echo $! > "$REFERENCE_DIR/driver.pid"
    echo "started: driver pid $!, log $REFERENCE_DIR/driver.log; '$0 status' shows the runs"
}

drive() {  # in the background: one Snakemake invocation per seed, so seed 0 of every method finishes first
    cd "$CODE"
    export HAR_DATA="${HAR_DATA:-$(cd "$HERE/.." && pwd)/shared/data}"
    for seed in "${SEEDS[@]}"; do
        targets=()
        for method in "${METHODS[@]}"; do  # a run finished and saved under results/reference/runs is done
            [ -f "$HERE/results/reference/runs/$SPLIT/$method/seed$seed/train.json" ] ||
                targets+=("results/runs/$SPLIT/$method/seed$seed/eval/test.json")
        done
        [ ${#targets[@]} -eq 0 ] ||
            .venv/bin/snakemake --profile profiles/local --configfile config/reference.yaml --cores 2 "${targets[@]}"
    done
    echo "every reference run trained and evaluated; save them: make reference-save"
}

"${1:-status}"
