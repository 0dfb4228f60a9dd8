#!/usr/bin/env bash
# fp32 CE+DRW seed 0 with the current code (a clone at /work/fp32-probe/code); the same command resumes.
cd /work/fp32-probe/code
export PYTHONPATH=/work/fp32-probe/code OMP_NUM_THREADS=1
exec /work/main/.venv/bin/python -u -c 'from har.cli import main; main()' run \
  --config results/reference/runs/cifar10-r100/ce_drw/seed0/config.yaml --out /work/fp32-probe/ce_drw/seed0 \
  --set train.amp=false --set data.bundle=null --set data.root=/work/shared/data
