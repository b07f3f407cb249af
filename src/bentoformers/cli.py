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


# ---- keys (issue 3): the key itself is printed once and never stored --------------------------------------


def _keys_create(args: argparse.Namespace) -> int:
    from .auth import create_key

    try:
        key, record = create_key(args.id, args.scopes, args.tier, args.file)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(key)
    if args.file is not None:
        print(f"stored its hash in {args.file} (id {record.id}); the key is shown only this once", file=sys.stderr)
    else:
        import yaml

        print("add this record to the key file (BENTOFORMERS_API_KEYS_FILE); the key is shown only this once:",
              file=sys.stderr)
        print(yaml.safe_dump([record.model_dump(mode="json")], sort_keys=False), file=sys.stderr, end="")
    return 0


def _add_keys_parser(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser(
        "create",
        help="create an API key: prints it once, stores only its hash",
        description="Prints a new API key on stdout (once) and appends its record {id, hash, scopes, tier} to "
        "the key file; without --file, prints the record to add yourself.",
    )
    create.add_argument("--id", required=True, help="key id: who holds it (letters, digits, '.', '-')")
    create.add_argument(
        "--scopes", nargs="+", default=["*"], metavar="TASK",
        help="tasks it may call: embeddings, classification, generation, or * (default: *)",
    )
    create.add_argument("--tier", default="default", help="rate-limit tier (default: %(default)s)")
    create.add_argument("--file", type=Path, help="key file to append to (created with mode 0600)")
    create.set_defaults(func=_keys_create)


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
    _add_keys_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
