"""`python -m llava.convert --src DIR --dst DIR [--dtype ...]`: the converter's command line."""

from __future__ import annotations

import argparse
import sys

from llava.convert.conversion import convert_lmms_lab_to_hf


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like the other entry points
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> int:
    parser = _OneLineParser(
        prog="python -m llava.convert",
        description="Convert an lmms-lab LLaVA-NeXT checkpoint (original layout) to the llava-hf layout.",
    )
    parser.add_argument("--src", required=True, help="lmms-lab checkpoint directory (read only)")
    parser.add_argument("--dst", required=True, help="new llava-hf directory (must not exist)")
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="cast weights (default: keep)"
    )
    args = parser.parse_args(argv)

    def convert(_argv) -> int:
        print(f"wrote {convert_lmms_lab_to_hf(args.src, args.dst, dtype=args.dtype)}")
        return 0

    from mmprune.base.entry import run_main

    return run_main(convert)
