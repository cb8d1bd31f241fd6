"""The ``medsam3`` command line: one subcommand per stage (prepare → train → evaluate → serve)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from medsam3.config import ConfigError, config_path, load_config
from medsam3.errors import StageError


def _stage_help(stage: str) -> str:
    text = f"options (key=value, defaults from {config_path(stage).name}):\n\n" + config_path(stage).read_text()
    shared = "".join(f"  {line}".rstrip() + "\n" for line in config_path("storage").read_text().splitlines())
    return text + "\n# s3:// settings, shared by every stage (configs/storage.yaml):\nstorage:\n" + shared


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

    export = sub.add_parser("export", help="a run's latest checkpoint as a Hugging Face dir (LoRA: the adapter)",
                            epilog=_stage_help("export"), formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("out_dir", metavar="OUT_DIR")
    export.add_argument("overrides", nargs="*", metavar="key=value", help="storage.* settings (see below)")

    predict = sub.add_parser(
        "predict",
        help="masks for text prompts (and boxes) on one scan: NIfTI/DICOM-SEG/PNG, overlays, summary",
        description="Segment INPUT (PNG/JPEG, NIfTI, NPZ or a DICOM series folder) with each --prompt and "
        "write the masks in the input's own terms (NIfTI label map with its affine, DICOM-SEG, PNG), "
        "overlay.png and summary.json to --out.",
        epilog=_stage_help("predict"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.add_argument("input", metavar="INPUT")
    predict.add_argument("--prompt", action="append", default=[], help="text prompt (repeat for several)")
    predict.add_argument("--box", action="append", default=[],
                         help="x0,y0,x1,y1 in input pixels for the prompt of the same position (repeatable); "
                              "with --mode propagate, x0,y0,x1,y1@z=N seeds the tracker on slice N")
    predict.add_argument("--mode", choices=("slices", "propagate"),
                         help="3D inputs: each slice on its own (default) or propagated with the tracker")
    predict.add_argument("--checkpoint", required=True, help="exported or released SAM3 directory")
    predict.add_argument("--adapter", help="LoRA adapter directory (an exported train.method=lora run) applied "
                                           "to the --checkpoint base")
    predict.add_argument("--out", required=True, help="output folder (replaced atomically)")
    predict.add_argument("--config", help="YAML file merged over the built-in config")
    predict.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (see below)")

    evaluate = sub.add_parser(
        "evaluate",
        help="Dice/IoU/NSD/HD95 of one or two checkpoints on prepared shards, text and text+box prompts",
        description="Run each --checkpoint over SHARDS in a Ray Data actor pool and write metrics.csv, "
        "report.md, summary.json and a gallery to --out.",
        epilog=_stage_help("evaluate"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("shards", metavar="SHARDS")
    evaluate.add_argument("--checkpoint", action="append", required=True, help="DIR or NAME=DIR (repeat for two)")
    evaluate.add_argument("--out", required=True)
    evaluate.add_argument("--split", choices=["auto", "val", "train", "all"],
                          help="cases to score (default auto: the ones the checkpoint's run never trained on)")
    evaluate.add_argument("--scans", help="the folder prepare read: score 3D cases as whole volumes")
    _add_common(evaluate)

    serve_cmd = sub.add_parser(
        "serve",
        help="an autoscaled Ray Serve HTTP endpoint (POST /v1/segment, a web page at /)",
        description="Start a local Ray (or join --address) and deploy the segmentation app of "
        "configs/serve.yaml with the given checkpoints. Stops with Ctrl-C.",
    )
    serve_cmd.add_argument("--checkpoint", action="append", required=True,
                           help="DIR or NAME=DIR (repeat to serve several; the first is the default)")
    serve_cmd.add_argument("--adapter", action="append", default=[],
                           help="NAME=DIR of a LoRA adapter on the first checkpoint (repeatable); requests "
                                "choose it with model=NAME")
    serve_cmd.add_argument("--port", type=int, default=8000)
    serve_cmd.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    serve_cmd.add_argument("--config", help="Serve config (default configs/serve.yaml)")
    serve_cmd.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    serve_cmd.add_argument("--no-block", action="store_true", help="return once deployed (Ray keeps serving)")

    imp = sub.add_parser(
        "import", help="a SAM3 / Medical SAM3 checkpoint in Meta's format (.pt) as a Hugging Face dir",
        description="Convert Meta's sam3.pt (or a Medical SAM3 checkpoint in its format) into a folder "
        "every stage accepts as --checkpoint / model.path, with import_report.json. Refused, nothing "
        "written, when any model tensor would stay uninitialised or any shape differs.")
    imp.add_argument("weights", metavar="WEIGHTS.pt")
    imp.add_argument("out_dir", metavar="OUT_DIR")
    imp.add_argument("--bpe", required=True, metavar="BPE",
                     help="CLIP's merges file bpe_simple_vocab_16e6.txt.gz (in Meta's sam3 assets): the tokenizer")
    imp.add_argument("--kind", choices=("auto", "image", "video"), default="auto",
                     help="video: detector + tracker (for propagate); auto: video when the file has a tracker")
    imp.add_argument("--preset", help="the architecture of a configs/model preset instead of SAM3's (tests)")

    phantom = sub.add_parser("phantom", help="write the synthetic CT phantom dataset (MSD layout)")
    phantom.add_argument("output", metavar="OUTPUT")
    phantom.add_argument("--cases", type=int, default=3, help="number of volumes (default 3)")
    phantom.add_argument("--shape", default="128,128,64", help="volume shape x,y,z (default 128,128,64)")
    phantom.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow the options (argparse stops taking positionals there)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
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
            from pipelines.export import export_run

            cfg = load_config("export", args.overrides)
            out = export_run(args.run_dir, args.out_dir, cfg.tracker, cfg.allow_random_tracker, cfg.merge)
            print(f"exported to {out}")
        elif args.command == "predict":
            from medsam3.inference import inference_config
            from pipelines.predict import run_predict

            cfg = inference_config(args.overrides + ([f"mode={args.mode}"] if args.mode else []), args.config)
            summary = run_predict(args.input, args.prompt, args.checkpoint, args.out, cfg, boxes=args.box,
                                  adapter=args.adapter)
            for entry in summary["prompts"]:
                size = f"{entry['volume_ml']} ml" if "volume_ml" in entry else f"{entry['pixels']} px"
                flag = "  (not a training prompt)" if not entry["in_vocabulary"] else ""
                print(f"{entry['prompt']}: {size}, score {entry['score']}{flag}")
            print(f"written to {args.out}: {', '.join(summary['files'])}, summary.json")
        elif args.command == "evaluate":
            from medsam3.inference import inference_config
            from pipelines.evaluate import run_evaluate

            cfg = inference_config(args.overrides, args.config, args.params, stage="evaluate")
            if args.split:
                cfg.split = args.split
            if args.scans:
                cfg.scans = args.scans
            run_evaluate(args.shards, args.checkpoint, args.out, cfg, address=args.address)
            from medsam3.io import storage

            report = storage.join(args.out, "report.md")
            print(storage.read_text(report).split("\n## ", 2)[1].split("\n", 1)[1])
            print(f"report: {report}")
        elif args.command == "serve":
            from serve.guard import ApiKeys
            from serve.run import parse_adapters, parse_checkpoints, serve_config, start

            checkpoints, adapters = parse_checkpoints(args.checkpoint), parse_adapters(args.adapter)
            url = start(checkpoints, args.port, args.host, args.address, args.config, adapters=adapters)
            first = next(iter(checkpoints))
            print(f"serving {', '.join([*checkpoints, *adapters])} at {url}  (web page: {url}/, API docs: {url}/docs)")
            auth = serve_config(args.config)["applications"][0]["args"]["settings"].get("auth")
            if ApiKeys.configured(auth):
                print("authentication: on (send Authorization: Bearer KEY to /v1/*)")
                print(f"example: curl -H 'Authorization: Bearer KEY' -F file=@scan.nii.gz -F prompt=liver "
                      f"-F model={first} {url}/v1/segment")
            else:
                print("authentication: OFF — anyone who can reach this address may send scans "
                      "(set settings.auth in the Serve config to require API keys)")
                print(f"example: curl -F file=@scan.nii.gz -F prompt=liver -F model={first} {url}/v1/segment")
            if not args.no_block:
                import time

                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    from ray import serve

                    serve.shutdown()
        elif args.command == "import":
            from medsam3.meta_import import import_checkpoint, summary

            report = import_checkpoint(args.weights, args.out_dir, args.bpe, args.kind, args.preset)
            print(summary(report))
            print(f"imported to {args.out_dir} (report: {args.out_dir}/import_report.json)")
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
