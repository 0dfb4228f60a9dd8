"""The run layer: what a run folder is and everything that reads or writes one (its file names, resolved config
and hash, metrics history, checkpoints, lock, stage-one record, the machine it trained on), and the assembly of a
run from its config (with its learning-rate schedule).

Training (`har.engine`), evaluation, the pipeline and reporting stand on it, and none of them spells a run folder's
file name; it stands on the data, models, losses and methods it assembles.
"""
