"""``visadapt`` command line: ``list``, ``inspect FILE``, ``sites MODEL``, ``convert-bitadapter BIN YAML``,
``export ADAPTER --to DIR [--format dense|peft|diffusers|resadapter]``."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from visadapt.progress import add_no_progress_flag, apply_no_progress_flag


def _cmd_list(args: argparse.Namespace) -> int:
    from visadapt.registry import get_plugin, list_plugins

    for name in list_plugins():
        plugin = get_plugin(name)
        merge = "mergeable" if plugin.mergeable else "not mergeable"
        print(f"{name}  [{', '.join(plugin.families)}]  ({merge})  {plugin.__module__}")
        for field, default, help_text in plugin.Config.field_help():
            print(f"    {field} = {default!r}    {help_text}")
    return 0


def printable(text: object) -> str:
    """``text`` with every non-printable character escaped (``\\x1b``, ``\\u202e``, ``\\n``): what a file's header
    says reaches the terminal as text, never as escape sequences that move the cursor, recolour or hide lines."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))


def _cmd_inspect(args: argparse.Namespace) -> int:
    from visadapt.io import check_header, read_adapter_file

    tensors, meta = read_adapter_file(args.file)  # the header is checked whole (check_header) before use
    header = check_header(args.file, meta)
    params = sum(t.numel() for t in tensors.values())
    data_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    print(printable(f"file:          {args.file} ({Path(args.file).stat().st_size:,} bytes on disk)"))
    for key in ("plugin", "adapter_name", "head", "format_version", "visadapt_version"):
        print(f"{key + ':':<15}{printable(meta.get(key) or '-')}")
    print(f"{'base model:':<15}{printable(json.dumps(header.base_model, sort_keys=True))}")
    print(f"{'config:':<15}{printable(json.dumps(header.config, indent=None))}")
    print(f"{'tensors:':<15}{len(tensors)}")
    print(f"{'parameters:':<15}{params:,}")
    print(f"{'tensor bytes:':<15}{data_bytes:,}")
    if args.keys:
        for key, tensor in sorted(tensors.items()):
            print(printable(f"  {key}  {tuple(tensor.shape)}  {str(tensor.dtype).replace('torch.', '')}"))
    return 0


def build_model(spec: str):
    """A randomly initialised model from a timm name, ``open_clip:NAME``, or a diffusers UNet folder."""
    path = Path(spec)
    if path.exists():
        config_dir = path / "unet" if (path / "unet" / "config.json").exists() else path
        from diffusers import UNet2DConditionModel, UNet2DModel

        config = json.loads((config_dir / "config.json").read_text())
        cls = UNet2DModel if config.get("_class_name") == "UNet2DModel" else UNet2DConditionModel
        return cls.from_config(config)
    if spec.startswith("open_clip:"):
        import open_clip

        return open_clip.create_model(spec.split(":", 1)[1], pretrained=None)
    import timm

    import visadapt.backbones  # noqa: F401  (registers the embedded visadapt_procvit_tiny with timm)

    return timm.create_model(spec, pretrained=False)


def _cmd_sites(args: argparse.Namespace) -> int:
    from visadapt.sites import all_sites, model_family

    model = build_model(args.model)
    family = model_family(model)
    sites = all_sites(model)
    if args.kind:
        sites = [s for s in sites if s.kind in args.kind]
    print(f"{args.model}: {family}, {len(sites)} sites")
    for s in sites:
        tower = f"[{s.tower}] " if s.tower else ""
        print(f"  {tower}block {s.block:>3}  {s.kind:<9} {s.path:<60} in {s.in_features:>5}  out {s.out_features:>5}")
    return 0


def _cmd_convert_bitadapter(args: argparse.Namespace) -> int:
    import timm
    import yaml

    from visadapt.plugins.bitadapter import convert_official_checkpoint

    config = yaml.safe_load(Path(args.config).read_text()) or {}
    if "num_class" not in config:
        raise ValueError(f"{args.config} has no num_class: it is not an official binary-adapter config")
    # Only the adapter and head tensors are converted, so the backbone needs its shapes, not its weights.
    model = timm.create_model(args.model, pretrained=False, num_classes=int(config["num_class"]))
    path = convert_official_checkpoint(args.bin, args.config, model, args.output)
    print(f"wrote {path} ({os.path.getsize(path):,} bytes; {args.bin}: {os.path.getsize(args.bin):,} bytes)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from visadapt.export import REPORT_FILE, ExportParityError, export_model, format_report

    if args.format != "dense":
        return _cmd_export_interop(args)

    try:
        report = export_model(args.adapter, args.model, to=args.to, pretrained=args.pretrained, onnx=args.onnx,
                              probe_size=args.probe_size, num_classes=args.num_classes, tolerance=args.tolerance,
                              onnx_tolerance=args.onnx_tolerance, overwrite=args.overwrite)
    except ExportParityError as err:
        print(format_report(err.report), file=sys.stderr)
        print(f"visadapt export: error: {err}", file=sys.stderr)
        return 1
    print(format_report(report))
    print(f"  report: {Path(args.to) / REPORT_FILE}")
    return 0


def _cmd_export_interop(args: argparse.Namespace) -> int:
    from visadapt.export import ExportParityError
    from visadapt.interop_export import export_file, format_report

    if args.onnx or args.num_classes is not None:
        raise ValueError(f"--format {args.format} writes a LoRA folder for another library; --onnx and "
                         f"--num-classes belong to --format dense (the merged model)")
    try:
        report = export_file(args.adapter, args.format, args.to, model=args.model, pretrained=args.pretrained,
                             probe_size=args.probe_size, tolerance=args.tolerance, overwrite=args.overwrite)
    except ExportParityError as err:
        print(f"visadapt export: error: {err}", file=sys.stderr)
        return 1
    print(format_report(report))
    return 0


def plain_help(text: str) -> str:
    """A docstring as ``--help`` shows it: reStructuredText's ``literal`` and :role:`target` markup dropped, so a
    terminal prints ``inspect FILE`` as inspect FILE."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return re.sub(r"``([^`]+)``", r"\1", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visadapt", description=plain_help(__doc__))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered plugins with their model families and config fields")
    p = sub.add_parser("inspect", help="metadata, tensor count, parameter count and bytes of an adapter file")
    p.add_argument("file")
    p.add_argument("--keys", action="store_true", help="also list every tensor")
    p = sub.add_parser("sites", help="attachable sites of a model (random init, nothing downloaded)")
    p.add_argument("model", help="timm name (vit_base_patch16_224), open_clip:NAME, or a diffusers folder")
    p.add_argument("--kind", action="append", help="only these site kinds (repeatable)")
    p = sub.add_parser("convert-bitadapter", help="an official binary-adapter .bin + YAML (PETL-ViT release) "
                                                  "to a visadapt adapter file")
    p.add_argument("bin", help="official checkpoint, e.g. models_bin/adaptformer/dtd-bit1-dim32.bin")
    p.add_argument("config", help="its YAML, e.g. configs/adaptformer/dtd-bit1-dim32.yaml")
    p.add_argument("--model", default="vit_base_patch16_224.augreg_in21k",
                   help="timm name of the backbone it was trained on (only its shapes are used)")
    p.add_argument("-o", "--output", required=True, help="adapter file to write")
    _add_export_parser(sub)
    args = parser.parse_args(argv)
    apply_no_progress_flag(args)
    handler = {"list": _cmd_list, "inspect": _cmd_inspect, "sites": _cmd_sites,
               "convert-bitadapter": _cmd_convert_bitadapter, "export": _cmd_export}[args.command]
    try:
        return handler(args)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
        # messages quote file names and header values: escaped, like everything inspect prints
        message = f"visadapt {args.command}: error: {err}"
        print("\n".join(printable(line) for line in message.split("\n")), file=sys.stderr)
        return 2
    except BrokenPipeError:  # `visadapt sites ... | head`: the reader left, which is not an error
        sys.stderr.close()
        return 0


def _add_export_parser(sub) -> None:
    from visadapt.export import DENSE_RTOL, ONNX_RTOL

    p = sub.add_parser("export", help="merge an adapter into its base model and write a dense checkpoint loadable "
                                      "without visadapt (and --onnx a graph), or (--format) a PEFT / diffusers / "
                                      "official ResAdapter LoRA folder; each checked for output parity")
    p.add_argument("adapter", help="visadapt adapter file (.safetensors)")
    p.add_argument("--format", choices=("dense", "peft", "diffusers", "resadapter"), default="dense",
                   help="dense (default): the merged model in its library's layout; peft: adapter_config.json + "
                        "adapter_model.safetensors for PeftModel.from_pretrained; diffusers: "
                        "pytorch_lora_weights.safetensors for pipe.load_lora_weights; resadapter: the official "
                        "two files. Each non-dense folder is loaded back by its own library and compared")
    p.add_argument("--model", default=None,
                   help="timm name, open_clip:NAME, or a diffusers UNet folder / pipeline folder with unet/ "
                        "(default: the backbone recorded in the adapter file by the train/ scripts)")
    p.add_argument("--pretrained", default=None,
                   help="base weights: default, none, a local checkpoint file, an open_clip tag or a timm hub id "
                        "(default: what the adapter file records, else default; for --format peft/diffusers/"
                        "resadapter none: their parity check needs no real weights)")
    p.add_argument("--to", required=True, help="output folder (created; must be empty unless --overwrite)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx, checked with onnxruntime; for an "
                                                        "adapter that does not fold into base weights, only it")
    p.add_argument("--probe-size", type=int, default=2, help="examples in the seeded probe batch (default 2)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="timm classifier size (default: the head stored in the adapter file, else 0)")
    p.add_argument("--tolerance", type=float, default=DENSE_RTOL,
                   help=f"dense parity tolerance per output, relative to max(1, max |output|) "
                        f"(default {DENSE_RTOL:g})")
    p.add_argument("--onnx-tolerance", type=float, default=ONNX_RTOL,
                   help=f"ONNX parity tolerance, relative likewise (default {ONNX_RTOL:g})")
    p.add_argument("--overwrite", action="store_true", help="empty a non-empty --to folder first (--format "
                                                             "peft/diffusers/resadapter: replace its files of the "
                                                             "same names only)")
    add_no_progress_flag(p)


if __name__ == "__main__":
    sys.exit(main())
