"""The run layer: what a run folder is and everything that reads or writes one (its file names, resolved config
and hash, metrics history, checkpoints, lock, stage-one record), and the assembly of a run from its config.

Training (`har.engine`), evaluation, methods, the pipeline and reporting stand on it; none of them spells a run
folder's file name.
"""
