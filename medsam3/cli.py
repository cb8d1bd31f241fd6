"""The ``medsam3`` command line: one subcommand per stage (prepare → train → evaluate → serve)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from medsam3.config import ConfigError, config_path, load_config
from medsam3.errors import StageError


def _stage_help(stage: str) -> str:
    return f"options (key=value, defaults from {config_path(stage).name}):\n\n" + config_path(stage).read_text()


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (see below)")
    parser.add_argument("--config", help="YAML file merged over the built-in config")
    parser.add_argument("--params", help="DVC params.yaml; its section for this stage is merged in")
    parser.add_argument("--address", help="Ray cluster address (default: start a local Ray on this machine)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsam3", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    prepare = sub.add_parser(
        "prepare",
        help="scans (NIfTI, DICOM+SEG, NPZ, PNG) → Parquet shards of (image, mask, box, prompt)",
        description="Read every case under INPUT (a dataset folder or a folder of dataset folders), "
        "cut 3D scans into slices, normalise, resize and pair each mask with its text prompt, and "
        "write Parquet shards plus manifest.json and rejected.json to OUTPUT.",
        epilog=_stage_help("prepare"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prepare.add_argument("input", metavar="INPUT", help="dataset folder, or folder of dataset folders")
    prepare.add_argument("output", metavar="OUTPUT", help="shard folder to create (replaced atomically)")
    _add_common(prepare)

    train = sub.add_parser(
        "train",
        help="full fine-tuning of SAM3 on prepared shards (Ray Train + DeepSpeed ZeRO-3)",
        description="Train SAM3 on SHARDS (a `medsam3 prepare` output) into RUN_DIR. Running it again "
        "with the same RUN_DIR resumes from the latest checkpoint.",
        epilog=_stage_help("train"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("shards", metavar="SHARDS")
    train.add_argument("run_dir", metavar="RUN_DIR")
    _add_common(train)

    export = sub.add_parser("export", help="consolidate a run's latest ZeRO-3 checkpoint into a Hugging Face dir")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("out_dir", metavar="OUT_DIR")

    phantom = sub.add_parser("phantom", help="write the synthetic CT phantom dataset (MSD layout)")
    phantom.add_argument("output", metavar="OUTPUT")
    phantom.add_argument("--cases", type=int, default=3, help="number of volumes (default 3)")
    phantom.add_argument("--shape", default="128,128,64", help="volume shape x,y,z (default 128,128,64)")
    phantom.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prepare":
            from preprocessing.prepare import format_summary, run_prepare

            cfg = load_config("prepare", args.overrides, args.config, args.params)
            print(format_summary(run_prepare(args.input, args.output, cfg, address=args.address)))
        elif args.command == "train":
            from pipelines.train import run_train

            cfg = load_config("train", args.overrides, args.config, args.params)
            result = run_train(args.shards, args.run_dir, cfg, address=args.address)
            print(f"trained to step {result.metrics.get('step')}; checkpoint {result.checkpoint.path}")
        elif args.command == "export":
            from pipelines.train import export_run

            print(f"exported to {export_run(args.run_dir, args.out_dir)}")
        elif args.command == "phantom":
            from medsam3.phantom import write_phantom_dataset

            shape = tuple(int(s) for s in args.shape.split(","))
            out = write_phantom_dataset(args.output, args.cases, shape, seed=args.seed)
            print(f"phantom dataset with {args.cases} case(s) written to {out}")
    except (ConfigError, StageError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
