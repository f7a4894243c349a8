"""`dsv3 <verb>`: the command line. Each verb lives in the module that does the work and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys

# module -> it defines `register(subparsers)`, adding its verb(s) with `set_defaults(func=...)`
VERB_MODULES = ["dsv3.info", "dsv3.cost", "dsv3.checkpoint", "dsv3.prepare", "dsv3.train", "dsv3.plot", "dsv3.quickstart", "dsv3.generate", "dsv3.server.cli"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3, end to end.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name in VERB_MODULES:
        importlib.import_module(name).register(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"dsv3 {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
