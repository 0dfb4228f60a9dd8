#!/usr/bin/env bash
# The reference runs (config/reference.yaml) in the background, in a folder outside the work tree that outlives a
# working session: `make reference-start` (docs/reference.md).
#
#   workflow/reference.sh start    clone this project at the training commit into $REFERENCE_DIR/code (once), install
#                                  it, bring in the checkpoints committed under results/reference/ that the folder
#                                  lacks, and train in the background
#   workflow/reference.sh stop     stop the workers; each run saves a checkpoint where it is (resumed by `start`)
#   workflow/reference.sh status   what is running, each run's last finished epoch and, for a run under way, about
#                                  how long it has left
#
# Two workers, one core each, take the runs in this order: seed 0 of every method, the fp32 control (HAR(LDAM)+DRW
# seed 0 exactly as the paper grid trains it, in fp32: the evidence that bf16 changes nothing seeds don't), seed 1,
# seed 2. A run is one Snakemake job (the pipeline's own train and evaluate jobs); a run already finished and saved
# under results/reference/runs is skipped. The training code is the commit in results/reference/TRAINING_COMMIT
# (written by the first start), so that editing this checkout never changes how a run of the set goes on; the set
# trains with that clone's own .venv.
set -euo pipefail
HERE="${HERE:-$(cd "$(dirname "$0")/.." && pwd)}"  # the project checkout (the driver's copy is told it)
cd "$HERE"
REFERENCE_DIR="${REFERENCE_DIR:-$(cd .. && pwd)/har-reference}"
CODE="$REFERENCE_DIR/code"
PIN="results/reference/TRAINING_COMMIT"
METHODS=(ce_drw har_ce_drw ldam_drw har_ldam_drw)
SEEDS=(0 1 2)
SPLIT=cifar10-r100
CONTROL="har_ldam_drw_fp32"  # folder name of the fp32 control (method har_ldam_drw of config.yaml, seed 0)
QUEUE="$REFERENCE_DIR/queue"

alive() { [ -f "$REFERENCE_DIR/driver.pid" ] && kill -0 "$(cat "$REFERENCE_DIR/driver.pid")" 2>/dev/null; }

status() {
    if alive; then echo "running (driver pid $(cat "$REFERENCE_DIR/driver.pid")), log $REFERENCE_DIR/driver.log"
    else echo "not running"; fi
    for seed in "${SEEDS[@]}"; do
        for method in "${METHODS[@]}" $([ "$seed" = 0 ] && echo "$CONTROL"); do
            run="$CODE/results/runs/$SPLIT/$method/seed$seed"
            kept="$HERE/results/reference/runs/$SPLIT/$method/seed$seed"
            saved=$( [ -f "$kept/train.json" ] && echo "saved" || echo "")
            # a run saved by another machine is not in this machine's clone: count its committed epochs
            [ -f "$run/metrics.jsonl" ] || { [ -n "$saved" ] && run="$kept"; }
            epochs=$( [ -f "$run/metrics.jsonl" ] && wc -l < "$run/metrics.jsonl" || echo 0)
            mark=$( [ -f "$run/eval/test.json" ] && echo "evaluated" || echo "")
            [ -n "$mark$saved" ] || [ "$epochs" = 0 ] || mark=$(to_go "$run")
            echo "  $method seed $seed: $epochs epochs $mark $saved"
        done
    done
}

to_go() {  # an unfinished run's epochs left and the time they take at its last ten epochs' pace
    "$CODE/.venv/bin/python" - "$1" <<'EOF' || true
import json
import statistics
import sys
from pathlib import Path

import yaml

run = Path(sys.argv[1])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
left = yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] - len(rows)
pace = statistics.median(row["seconds"] for row in rows[-10:])  # a pause (SIGSTOP) inflates one epoch, not this
print(f"({left} to go: about {left * pace / 3600:.1f} h at its last ten epochs' median of {pace:.0f} s an epoch)"
      if left > 0 else "(trained, not yet evaluated)")
EOF
}

start() {
    if alive; then echo "already running: driver pid $(cat "$REFERENCE_DIR/driver.pid")"; exit 0; fi
    mkdir -p "$REFERENCE_DIR"
    if [ ! -f "$PIN" ]; then
        git diff --quiet HEAD -- har workflow config pyproject.toml || {
            echo "commit har/, workflow/ and config/ first: the set trains with a committed version" >&2; exit 1; }
        mkdir -p "$(dirname "$PIN")"
        git rev-parse HEAD > "$PIN"
        echo "pinned the training code at $(cat "$PIN") ($PIN: commit it)"
    fi
    commit="$(cat "$PIN")"
    [ -d "$CODE/.git" ] || git clone -q "$HERE" "$CODE"
    git -C "$CODE" fetch -q "$HERE" "$commit" 2>/dev/null || git -C "$CODE" fetch -q "$HERE"
    git -C "$CODE" checkout -q --detach "$commit"
    make -C "$CODE" install PYTHON="${PYTHON:-python3}"
    .venv/bin/python -m har.reference restore --into "$CODE"
    # the driver runs a copy of this script: bash reads a script as it goes, so editing this one would change it
    cp "$HERE/workflow/reference.sh" "$REFERENCE_DIR/driver.sh"
    HERE="$HERE" nohup setsid bash "$REFERENCE_DIR/driver.sh" drive > "$REFERENCE_DIR/driver.log" 2>&1 &
    echo $! > "$REFERENCE_DIR/driver.pid"
    echo "started: driver pid $!, log $REFERENCE_DIR/driver.log; '$0 status' shows the runs"
}

stop() {  # SIGTERM to the driver's process group: Snakemake passes it on, each trainer saves where it is
    if alive; then kill -TERM -- "-$(cat "$REFERENCE_DIR/driver.pid")"; echo "stopping"; else echo "not running"; fi
}

snake() { .venv/bin/snakemake --profile profiles/local --configfile config/reference.yaml --nolock "$@"; }

run_task() {  # one queue line: "run METHOD SEED" or "control"
    set -- $1
    if [ "$1" = run ]; then
        [ -f "$HERE/results/reference/runs/$SPLIT/$2/seed$3/train.json" ] && return 0  # finished and saved
        snake --cores 1 "results/runs/$SPLIT/$2/seed$3/eval/test.json"
    else
        local out="results/runs/$SPLIT/$CONTROL/seed0"
        [ -f "$HERE/results/reference/runs/$SPLIT/$CONTROL/seed0/train.json" ] && return 0
        [ -f "$out/eval/test.json" ] && [ -f "$out/train.json" ] && return 0
        mkdir -p "$out" logs
        # the paper grid's own run config of HAR(LDAM)+DRW seed 0 (fp32, as config.yaml trains it), on this split;
        # prints the savings at which the pipeline's evaluate job would choose s (the paper's 15% among them)
        local savings
        savings=$(.venv/bin/python - "$out/control.yaml" <<'EOF'
import sys
import yaml
from snakemake.utils import validate
from har.config import dump_config
from har.pipeline import grid, jobs
cfg = yaml.safe_load(open("config.yaml"))
validate(cfg, schema="workflow/schemas/config.schema.yaml")
spec = next(s for s in grid.final_runs(cfg) if (s.split, s.method, s.seed) == ("cifar10-r100", "har_ldam_drw", 0))
open(sys.argv[1], "w").write(dump_config(jobs.job_run_config(cfg, spec, "results/splits/cifar10-r100/data.npz", None)))
print(*grid.target_savings(cfg, spec))
EOF
)
        OMP_NUM_THREADS=1 .venv/bin/har run --config "$out/control.yaml" --out "$out" >> "logs/control.log" 2>&1
        # har run chooses s at the config's savings only; add the paper's, from the cached outputs (no forward pass),
        # with this checkout's har as the rebuild uses it (the pinned training code may predate --target-savings)
        "$HERE/.venv/bin/har" evaluate --run "$out" --from-cache --target-savings $savings >> "logs/control.log" 2>&1
        echo '{"control": "fp32 HAR(LDAM)+DRW seed 0, trained by har run"}' > "$out/train.json"
    fi
}

worker() {  # take the queue's first line until it is empty
    while true; do
        task=$(flock "$QUEUE.lock" bash -c 'head -n 1 "$0" && sed -i 1d "$0"' "$QUEUE")
        [ -n "$task" ] || return 0
        echo "$(date -u +%FT%TZ) worker $1: $task"
        run_task "$task" || echo "$(date -u +%FT%TZ) worker $1: $task FAILED (status $?)"
    done
}

drive() {  # in the background: the split once, then two workers over the queue
    cd "$CODE"
    export HAR_DATA="${HAR_DATA:-$(cd "$HERE/.." && pwd)/shared/data}"
    snake --cores 1 "results/splits/$SPLIT/data.npz"
    : > "$QUEUE"
    for seed in "${SEEDS[@]}"; do
        for method in "${METHODS[@]}"; do echo "run $method $seed" >> "$QUEUE"; done
        [ "$seed" != 0 ] || echo "control" >> "$QUEUE"
    done
    worker 1 & worker 2 & wait
    echo "$(date -u +%FT%TZ) every reference run trained and evaluated; save them: make reference-save"
}

"${1:-status}"
