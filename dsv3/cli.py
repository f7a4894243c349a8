"""`dsv3 <verb>`: the command line. Each verb lives in the module that does the work and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys

# module -> it defines `register(subparsers)`, adding its verb(s) with `set_defaults(func=...)`
VERB_MODULES = ["dsv3.info", "dsv3.cost", "dsv3.checkpoint", "dsv3.prepare", "dsv3.train", "dsv3.plot",
                "dsv3.quickstart", "dsv3.generate", "dsv3.server.cli"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3, end to end.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    missing = {}  # module -> the package it needs and this install lacks (e.g. the server's fastapi on a GPU image)
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # the other verbs still work
            missing[name] = e.name
            continue
        module.register(sub)
    argv = sys.argv[1:] if argv is None else argv
    if missing and argv and not argv[0].startswith("-") and argv[0] not in sub.choices:
        lacking = "; ".join(f"{module} needs the package {package}" for module, package in missing.items())
        print(f"dsv3: no verb {argv[0]!r} here; verbs missing from this install: {lacking} "
              f"(pip install -e . installs them)", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"dsv3 {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
