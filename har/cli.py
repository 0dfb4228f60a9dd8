"""Command line: `har train | train-pack | evaluate | run | export-data | inat-list | imagenet-lt-split | flops`.

The Snakemake scripts call the same functions. Each command imports the modules it runs when it runs (start-up
cost: `har --help`, `har inat-list` and the others that train nothing start without loading torch)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from har.config import RunConfig, from_dict, load_config
from har.errors import ConfigError, DataError, FolderBusy, RunError
from har.facts import IMAGENET_LT_LISTS
from har.run.lock import EXIT_LOCKED

if TYPE_CHECKING:
    from har.data.build import RunData

log = logging.getLogger("har")

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a job stopped with Ctrl-C
AFTER_CTRL_C = {"train": "run the same command again to resume from the last checkpoint",
                "train-pack": "run the same command again to resume every member from its last checkpoint",
                "run": "run the same command again: training resumes from its last checkpoint",
                "evaluate": "run the same command again (an evaluation starts over)"}


def _fmt(value: float | None) -> str:
    return "  -  " if value is None else f"{100 * value:5.1f}"


def summary_lines(report: dict) -> list[str]:
    """A short human-readable account of one split's evaluation."""
    static = report["static"]
    shot = static["shot"]
    lines = [f"[{report['split']}] {report['num_examples']} images",
             f"  static  top-1 {_fmt(static['top1'])}   many {_fmt(shot['many'])}  medium {_fmt(shot['medium'])}"
             f"  few {_fmt(shot['few'])}   MACs {static['macs'] / 1e6:.2f} M"]
    for name, result in report["dynamic_selected"].items():
        fractions = " ".join(f"{e['fraction']:.2f}" for e in result["per_exit"])
        s = "/".join(f"{x:.3g}" for x in result.get("exit_thresholds", [result["exit_threshold"]]))
        lines.append(f"  dynamic s={s} ({name}, {result.get('protocol', 'val')})  top-1 {_fmt(result['top1'])}"
                     f"   MACs {result['mean_macs'] / 1e6:.2f} M  saving {100 * result['saving']:+.1f}%"
                     f" ({100 * result['saving_trunk']:+.1f}% heads not counted)"
                     f"   exit fractions {fractions}")
    return lines


def _train(cfg: RunConfig, out: Path, data: RunData | None = None) -> bool:
    """Train; True in the process that reports (rank 0 of a torchrun launch, or the only one)."""
    from har.engine.distributed import from_environment
    from har.engine.trainer import train

    history = train(cfg, out, data=data)
    main_process = from_environment().is_main
    if history and main_process:
        print(json.dumps(history[-1]))
    return main_process


def _evaluate(run: Path, device: str, data: RunData | None = None, target_savings: list[float] | None = None) -> None:
    from har.evaluation.evaluate import evaluate_run

    for report in evaluate_run(run, device=device, data=data, target_savings=target_savings).values():
        print("\n".join(summary_lines(report)))
    print(f"written: {run / 'eval'}/{{val,test}}.{{json,npz}}")


def cmd_train(args: argparse.Namespace) -> None:
    _train(load_config(args.config, args.set), args.out)


def cmd_train_pack(args: argparse.Namespace) -> None:
    from har.engine.pack import train_pack

    members = [(load_config(Path(config), args.set), Path(out)) for config, out in args.member]
    for (_, out), history in zip(members, train_pack(members), strict=True):
        print(json.dumps({"run": str(out), **(history[-1] if history else {})}))


def cmd_evaluate(args: argparse.Namespace) -> None:
    if args.target_savings is not None:  # checked by the rule that checks eval.target_savings in a config
        from_dict({"eval": {"target_savings": args.target_savings}})
    if not args.from_cache:
        _evaluate(args.run, args.device, target_savings=args.target_savings)
        return
    from har.evaluation.evaluate import evaluate_from_cache

    for report in evaluate_from_cache(args.run, args.target_savings).values():
        print("\n".join(summary_lines(report)))
    print(f"rewritten from the cache: {args.run / 'eval'}/{{val,test}}.json")


def cmd_run(args: argparse.Namespace) -> None:
    from har.data.build import build_data

    cfg = load_config(args.config, args.set)
    data = build_data(cfg.data)  # once for both steps
    if _train(cfg, args.out, data):  # one evaluation, by rank 0 of a distributed run
        _evaluate(args.out, cfg.train.device, data)


def cmd_export_data(args: argparse.Namespace) -> None:
    from har.data.build import export_bundle

    cfg = load_config(args.config, args.set)
    path = export_bundle(cfg.data, args.out)
    print(f"written: {path} ({path.stat().st_size / 2**20:.1f} MiB); use it with --set data.bundle={path}")


def cmd_inat_list(args: argparse.Namespace) -> None:
    from har.data.imagelist import write_split_list
    from har.data.inat import inat_split_list

    entries = inat_split_list(args.annotations)
    write_split_list(entries, args.out)
    print(f"written: {args.out} ({len(entries):,} images, {len(set(entries.labels.tolist())):,} classes); if its "
          f"git blob id differs from the published list's, run with data.strict_lists: false")


def cmd_imagenet_lt_split(args: argparse.Namespace) -> None:
    from har.data.imagelist import write_split_list
    from har.data.imagenet_lt import make_imagenet_lt_split

    split = make_imagenet_lt_split(args.imagenet, seed=args.seed, max_images=args.max_images,
                                   min_images=args.min_images, val_per_class=args.val_per_class)
    for name, entries in (("train", split.train), ("val", split.val)):
        path = args.out / IMAGENET_LT_LISTS[name].file_name
        write_split_list(entries, path)
        print(f"written: {path} ({len(entries):,} images)")
    print("these are our draws, not the published lists: results on them are not comparable with published "
          "numbers; train with data.strict_lists: false and the published (or your own) ImageNet_LT_test.txt")


def cmd_flops(args: argparse.Namespace) -> None:
    from har.evaluation.flops import flops_table
    from har.models import create_model
    from har.models.resnet_cifar import ResNetCifar

    optional = {"layout": args.layout, "exit_channels": args.exit_channels, "exit_stride": args.exit_stride}
    model = create_model(args.model, num_classes=args.num_classes, classifier=args.classifier,
                         **{k: v for k, v in optional.items() if v is not None})  # unset flags keep model defaults
    side = args.image_size or (32 if isinstance(model.backbone, ResNetCifar) else 224)
    print(json.dumps(flops_table(model, image_size=(3, side, side)), indent=1))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="har", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run_args = argparse.ArgumentParser(add_help=False)
    run_args.add_argument("--config", type=Path, default=None, help="run config YAML (default: all defaults)")
    run_args.add_argument("--out", type=Path, required=True, help="run folder (resumed if it holds this run)")
    run_args.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config field, e.g. --set train.epochs=2 (repeatable)")
    sub.add_parser("train", parents=[run_args], help="train one run (resumes an interrupted one)"
                   ).set_defaults(func=cmd_train)
    pk = sub.add_parser("train-pack", help="train several CIFAR runs of one shape together on one device, each "
                                           "exactly as har train would (resumes an interrupted pack)")
    pk.add_argument("--member", nargs=2, action="append", required=True, metavar=("CONFIG", "OUT"),
                    help="a member's run config and run folder (repeatable; members may differ in seed, loss, "
                         "HAR, DRW and input Mixup)")
    pk.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field of every member, e.g. --set train.epochs=2 (repeatable)")
    pk.set_defaults(func=cmd_train_pack)
    sub.add_parser("run", parents=[run_args], help="train, then evaluate").set_defaults(func=cmd_run)

    ev = sub.add_parser("evaluate", help="static and dynamic evaluation of a trained run")
    ev.add_argument("--run", type=Path, required=True, help="run folder written by har train")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    ev.add_argument("--from-cache", action="store_true",
                    help="recompute eval/*.json from the cached outputs (eval/*.npz) under the current rules, without "
                         "data or weights (default: off, a forward pass)")
    ev.add_argument("--target-savings", type=float, nargs="+", default=None, metavar="X",
                    help="MACs savings (fractions) at which to choose s, e.g. 0.25 0.15 (default: the run's "
                         "eval.target_savings; with --from-cache, also every saving the existing report chose s at)")
    ev.set_defaults(func=cmd_evaluate)

    ex = sub.add_parser("export-data", help="write a run's splits to one compressed file (for offline GPU machines)")
    ex.add_argument("--config", type=Path, default=None, help="run config YAML whose data section is exported")
    ex.add_argument("--out", type=Path, required=True, help="bundle file to write, e.g. .carry/cifar10-lt100.npz.xz")
    ex.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    ex.set_defaults(func=cmd_export_data)

    il = sub.add_parser("inat-list", help="write an iNaturalist 2018 split list from an official annotation file")
    il.add_argument("--annotations", type=Path, required=True, help="train2018.json or val2018.json")
    il.add_argument("--out", type=Path, required=True, help="list to write, e.g. splits/iNaturalist18_train.txt")
    il.set_defaults(func=cmd_inat_list)

    lt = sub.add_parser("imagenet-lt-split", help="cut ImageNet-LT-style train / val lists (Pareto, alpha 6) from "
                                                  "a full ImageNet train folder")
    lt.add_argument("--imagenet", type=Path, required=True, help="ImageNet root holding train/<class>/ folders")
    lt.add_argument("--out", type=Path, required=True, help="folder for ImageNet_LT_train.txt and ImageNet_LT_val.txt")
    lt.add_argument("--seed", type=int, default=0, help="default: 0")
    lt.add_argument("--max-images", type=int, default=1280, help="largest class (default: 1280, ImageNet-LT's)")
    lt.add_argument("--min-images", type=int, default=5, help="smallest class (default: 5)")
    lt.add_argument("--val-per-class", type=int, default=20, help="validation images per class (default: 20)")
    lt.set_defaults(func=cmd_imagenet_lt_split)

    fl = sub.add_parser("flops", help="MACs and parameters of the backbone and of each exit, as JSON")
    fl.add_argument("--model", default="resnet32", help="registered model name (default: resnet32)")
    fl.add_argument("--num-classes", type=int, default=10, help="default: 10")
    fl.add_argument("--layout", default=None, help="exit layout, e.g. CEBEBEBE (default: the model's)")
    fl.add_argument("--classifier", default="linear", choices=["linear", "cosine"], help="default: linear")
    fl.add_argument("--exit-channels", type=int, default=None, help="default: the model's (64)")
    fl.add_argument("--exit-stride", type=int, default=None, help="default: the model's (2)")
    fl.add_argument("--image-size", type=int, default=None,
                    help="input side (default: 32 for the CIFAR ResNets, else 224)")
    fl.set_defaults(func=cmd_flops)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        args.func(args)
    except FolderBusy as exc:  # before RunError, its base: another process holds the folder
        print(f"har {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except (ConfigError, DataError, RunError) as exc:
        print(f"har {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        advice = AFTER_CTRL_C.get(args.command, "nothing was written half-way; run the command again")
        print(f"har {args.command}: interrupted (Ctrl-C); {advice}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
