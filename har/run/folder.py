"""The files of a run folder, by name: the one place that spells them.

Folders written by earlier versions are read with the same names, so none of these may change.
"""

from __future__ import annotations

CONFIG = "config.yaml"  # the resolved config, every field spelled out
CONFIG_HASH = "config.sha256"  # its hash (`har.config.config_hash`), for a glance; comparisons re-hash CONFIG
METRICS = "metrics.jsonl"  # one row per finished epoch
CHECKPOINT = "last.pt"  # the newest checkpoint
PREVIOUS = "prev.pt"  # the one before, kept while the newest is written
MACHINE = "machine.jsonl"  # one record per start of training: the machine and what the config resolved to
LOCK = ".har.lock"  # held by the process that writes the folder (`har.engine.lock`)
STAGE_ONE_RECORD = "stage_one.json"  # a decoupled stage two: which stage one it started from
TRAIN_RECORD = "train.json"  # the pipeline's marker of a finished training
TRAIN_ERROR = "train.error"  # a member stopped inside a pack: its error, for whoever reads the folder
EVAL_DIR = "eval"  # evaluation: <split>.json reports and <split>.npz confidences
