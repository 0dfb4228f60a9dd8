"""LDAM-DRW's own training script (`cifar_train.py` of github.com/kaidic/LDAM-DRW), unchanged, on this machine's CPU
and on a CIFAR-10 copy: the differential run for a gap between our runs and published runs of LDAM-DRW's protocol.

`benchmarks/upstream_check.py` shows that our model, evaluation, class weights and loss compute what LDAM-DRW's
code computes; what it cannot show is the rest of a run (data order, augmentation, optimiser steps over 200 epochs)
and what the machine and the data copy do to it. Trained here on the same copy and CPU, LDAM-DRW's script answers
that at once: if it lands where our runs land, the gap lies in the environment; if where its published runs land,
in our training. Its code runs as it is; this wrapper only makes it run without a GPU or network: `.cuda()` returns
the tensor or module unchanged, `torch.cuda.FloatTensor` makes CPU tensors, the dataset's md5 check accepts a copy
whose files differ from the official release (as ../shared/data's do), and tensorboardX and scikit-learn (logging
and a confusion matrix's plot only) are stood in for when missing. Its `./data` is a link to `--data`; its logs and
checkpoints go under `--work` (`log/<store_name>/log_test.csv` holds each epoch's test top-1 and "Best Prec@1").

Everything after `--` goes to LDAM-DRW's own argument parser, e.g. CE+DRW on CIFAR-10-LT-100 (its defaults: ResNet-32,
200 epochs, batch 128, lr 0.1, weight decay 2e-4, subset drawn with rand_number 0):

    OMP_NUM_THREADS=1 python benchmarks/upstream_train.py --ldam-drw ../LDAM-DRW --data ../shared/data \\
        --work ../upstream-probe/ce_drw -- --loss_type CE --train_rule DRW --workers 0 --seed 0

An interrupted run continues with LDAM-DRW's `--resume <work>/checkpoint/<store_name>/ckpt.pth.tar` (weights,
optimiser, epoch and best top-1 so far, saved after every epoch; not the random state, so not bit-exact). The script
reopens its logs for writing on every start, so this wrapper first renames the logs an earlier start left
(`log_test.csv` -> `log_test.<time>.csv`), loads the checkpoint onto the CPU (the script asks for `cuda:0`), and
refuses a `--resume` path that is not a file (the script would train from scratch).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torchvision.datasets.cifar


def stand_ins() -> None:
    """CPU stand-ins for what the script asks of CUDA and of the network; stubs for its logging-only imports."""
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.cuda.FloatTensor = torch.FloatTensor
    torchvision.datasets.cifar.check_integrity = lambda *args, **kwargs: True  # the data files' and meta's md5
    load = torch.load

    def load_on_cpu(*args, **kwargs):
        """torch.load onto the CPU whatever map_location the caller names (--resume names 'cuda:0')."""
        return load(*args, **{**kwargs, "map_location": "cpu"})

    torch.load = load_on_cpu
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        class SummaryWriter:
            def __init__(self, *args, **kwargs) -> None:
                pass

            def __getattr__(self, name: str):
                return lambda *args, **kwargs: None

        sys.modules["tensorboardX"] = types.SimpleNamespace(SummaryWriter=SummaryWriter)
    try:
        import sklearn.metrics  # noqa: F401
    except ImportError:
        def confusion_matrix(targets, predictions) -> np.ndarray:
            labels = np.union1d(targets, predictions)
            cf = np.zeros((len(labels), len(labels)), dtype=np.int64)
            np.add.at(cf, (np.searchsorted(labels, targets), np.searchsorted(labels, predictions)), 1)
            return cf

        metrics = types.SimpleNamespace(confusion_matrix=confusion_matrix)
        multiclass = types.SimpleNamespace(unique_labels=lambda *ys: np.unique(np.concatenate(ys)))
        sys.modules.update({"sklearn": types.SimpleNamespace(metrics=metrics), "sklearn.metrics": metrics,
                            "sklearn.utils": types.SimpleNamespace(multiclass=multiclass),
                            "sklearn.utils.multiclass": multiclass})


def resume_path(value: str) -> str:
    """--resume's checkpoint as an absolute path (the script runs from --work); refused when missing, since the
    script would then say so and train from scratch."""
    path = Path(value)
    if not path.is_file():
        raise SystemExit(f"--resume {value}: no such checkpoint; give the ckpt.pth.tar of the run to continue")
    return str(path.resolve())


def main() -> int:
    split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    ours, theirs = sys.argv[1:split], sys.argv[split + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ldam-drw", required=True, type=Path, help="a checkout of github.com/kaidic/LDAM-DRW")
    parser.add_argument("--data", required=True, type=Path, help="the folder holding cifar-10-batches-py/")
    parser.add_argument("--work", required=True, type=Path, help="where the script's logs and checkpoints go")
    args = parser.parse_args(ours)
    script = args.ldam_drw.resolve() / "cifar_train.py"
    if not script.is_file():
        raise SystemExit(f"{script} not found: --ldam-drw must be a checkout of github.com/kaidic/LDAM-DRW")
    if not (args.data / "cifar-10-batches-py").is_dir():
        raise SystemExit(f"{args.data} holds no cifar-10-batches-py/: give the folder that holds it")
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / "data"
    if not data.exists():
        data.symlink_to(args.data.resolve(), target_is_directory=True)
    theirs = [resume_path(a) if i and theirs[i - 1] == "--resume" else a for i, a in enumerate(theirs)]
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for name in ("log_train.csv", "log_test.csv"):  # the script truncates them when it starts again
        for log in args.work.glob(f"log/*/{name}"):
            log.rename(log.with_suffix(f".{stamp}.csv"))
    stand_ins()
    os.chdir(args.work)
    sys.path.insert(0, str(script.parent))
    sys.argv = [str(script), *theirs]
    code = compile(script.read_text(), str(script), "exec")
    exec(code, {"__name__": "__main__", "__file__": str(script)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
