"""`fedhlm export`: the SLM for devices (ONNX, optional int8, head, tokenizer, manifest)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedhlm.models.export import MANIFEST_FILE, OPSET, export


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedhlm export", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="SLM folder or cache:<name> (e.g. cache:slm)")
    parser.add_argument("--format", default="onnx", choices=["onnx"])
    parser.add_argument("--quantize", choices=["int8"], default=None, help="also write an int8 model")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--max-length", type=int, default=None,
                        help="prompt length the device truncates to (default: the length the model was trained on)")
    parser.add_argument("--opset", type=int, default=OPSET)
    args = parser.parse_args(argv)
    try:
        manifest = export(args.model, args.out, quantize=args.quantize, max_length=args.max_length, opset=args.opset)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"fedhlm export: {err}", file=sys.stderr)
        return 1
    sizes = {p: (Path(args.out) / f).stat().st_size for p, f in manifest["files"]["models"].items()}
    for precision, name in manifest["files"]["models"].items():
        print(f"{precision}: {Path(args.out) / name} ({sizes[precision] / 2**20:.1f} MiB, max |logit diff| "
              f"{manifest['parity'][precision]['max_abs_logit_diff']:.2e})")
    print(f"manifest: {Path(args.out) / MANIFEST_FILE}")
    return 0
