"""`bentoformers` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_MODEL_LIST = Path("build/models.yaml")


def _build(args: argparse.Namespace) -> int:
    from .builder import build_model
    from .spec import load_model_list

    specs = load_model_list(args.models)
    if args.only:
        specs = [s for s in specs if s.name in args.only]
        missing = set(args.only) - {s.name for s in specs}
        if missing:
            print(f"error: not in {args.models}: {', '.join(sorted(missing))}", file=sys.stderr)
            return 2
    failed = []
    for spec in specs:
        try:
            results = build_model(spec, force=args.force)
        except RuntimeError as exc:
            print(f"error: {spec.name}: {exc}", file=sys.stderr)
            return 1
        failed += [r for r in results if r.status == "failed gate"]
    if failed:
        print("\nNot saved (below their fidelity gates):", file=sys.stderr)
        for r in failed:
            print(f"  {r.tag}: {r.reason}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bentoformers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser(
        "build",
        help="export, quantize, validate and store the models of a model list",
        description="For each model and variant: export to ONNX, optimise or quantize, validate against the "
        "fp32 PyTorch reference, and save into the BentoML model store. Up-to-date variants are skipped.",
    )
    build.add_argument("--models", type=Path, default=DEFAULT_MODEL_LIST, help="model list (default: %(default)s)")
    build.add_argument("--only", nargs="+", metavar="NAME", help="build only these entries")
    build.add_argument("--force", action="store_true", help="rebuild even if an identical variant is stored")
    build.set_defaults(func=_build)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
