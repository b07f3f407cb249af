"""`bentoformers`: build models into the BentoML store, serve them, list them, benchmark a server."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
import threading
import time
import typing
from pathlib import Path
from typing import Any

from bentoformers.exits import FAILED, OK, USAGE, CliError

DEFAULT_MODEL_LIST = Path("build/models.yaml")
DEFAULT_TARGET = "service:Gateway"
EXTRAS = {"serve": "bentoml", "build": "torch", "bench": "matplotlib"}

EPILOG = """\
exit codes: 0 done; 1 the work failed (a model with no variant that passes its fidelity gates, or with
`build --strict` any variant below them; a benchmark point with no successful answer); 2 a usage or
setup problem (bad flag, missing extra, nothing built), with a hint.

examples:
  bentoformers build                      export, quantize, validate and store build/models.yaml
  bentoformers serve --port 3000          serve the built default model
  bentoformers models                     what the model store holds, with fidelity figures
  bentoformers keys create --id team-a --file keys.yaml    a new API key (printed once, hash stored)
  bentoformers bench http://host:3000     throughput and latency sweep, JSON and a PNG plot
"""


def _need(extra: str, command: str) -> None:
    if importlib.util.find_spec(EXTRAS[extra]) is None:
        raise CliError(f"`bentoformers {command}` needs the {extra} extra: pip install 'bentoformers[{extra}]'")


# ---- build ------------------------------------------------------------------------------------------------


def _build(args: argparse.Namespace) -> int:
    _need("build", "build")
    from bentoformers.build.builder import build_model
    from bentoformers.spec import load_model_list

    if not args.models.is_file():
        raise CliError(f"no model list at {args.models}; run from the project folder or pass --models PATH")
    specs = load_model_list(args.models)
    if args.only:
        specs = [s for s in specs if s.name in args.only]
        missing = set(args.only) - {s.name for s in specs}
        if missing:
            raise CliError(f"not in {args.models}: {', '.join(sorted(missing))}")
    refused, unservable = [], []
    for spec in specs:
        try:
            results = build_model(spec, force=args.force, report=StepTicker(sys.stdout))
        except RuntimeError as exc:
            print(f"error: {spec.name}: {exc}", file=sys.stderr)
            return FAILED
        failed = [r for r in results if r.status == "failed gate"]
        refused += failed
        if not any(r.ok for r in results):
            unservable.append(spec.name)
        elif failed:
            print(f"{spec.name}: {_serves_instead(results)}")
    if refused:
        print("\nNot saved (below their fidelity gates):", file=sys.stderr)
        for r in refused:
            print(f"  {r.tag}: {r.reason}", file=sys.stderr)
    if unservable:
        print(f"\nNo servable variant: {', '.join(unservable)}", file=sys.stderr)
        return FAILED
    return FAILED if refused and args.strict else OK


def _serves_instead(results) -> str:
    from bentoformers.runtime.session import pick_device
    from bentoformers.serving.store import choose_precision

    refused = ", ".join(r.precision for r in results if r.status == "failed gate")
    device = pick_device()
    try:
        return f"{refused} refused; the service will serve {choose_precision([r.precision for r in results if r.ok], device)} on {device}"
    except RuntimeError as exc:
        return f"{refused} refused; {exc}"


class StepTicker:
    """The build's report callback: on a terminal, a step that is under way shows its running time."""

    def __init__(self, stream: Any = None, every: float = 0.5) -> None:
        self.stream = stream or sys.stderr
        self.every = every
        self.live = self.stream.isatty()
        self._line, self._started = "", 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, message: str) -> None:
        self._finish()
        if self.live and message.endswith(" ..."):
            self._line, self._started = message, time.monotonic()
            print(message, end="", file=self.stream, flush=True)
            self._stop.clear()
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()
        else:
            print(message, file=self.stream, flush=True)

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            print(f"\r{self._line} {time.monotonic() - self._started:.0f}s", end="", file=self.stream, flush=True)

    def _finish(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            print("\r\033[K", end="", file=self.stream)  # the "done in" line replaces the running one


# ---- keys (issue 3): the key itself is printed once and never stored ------------------------------------


def _keys_create(args: argparse.Namespace) -> int:
    _need("serve", "keys create")
    from bentoformers.security.keys import create_key

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
        help="tasks it may call: embeddings, classification, rerank, token-classification, generation, "
        "sparse-embeddings, or * (default: *)",
    )
    create.add_argument("--tier", default="default", help="rate-limit tier (default: %(default)s)")
    create.add_argument("--file", type=Path, help="key file to append to (created with mode 0600)")
    create.set_defaults(func=_keys_create)


# ---- serve ------------------------------------------------------------------------------------------------


def _settings_fields() -> dict[str, Any]:
    """Settings fields that can be flags, or {} when the serve extra is not installed."""
    if importlib.util.find_spec("pydantic_settings") is None:
        return {}
    from pydantic import SecretStr

    from bentoformers.settings import Settings

    # Secrets stay out of flags: a command line is visible to every user of the machine.
    return {n: f for n, f in Settings.model_fields.items() if SecretStr not in _types(f.annotation)}


def _types(annotation: Any) -> set[Any]:
    args = typing.get_args(annotation)
    return {annotation} | {t for a in args for t in _types(a)} if args else {annotation}


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    fields = _settings_fields()
    if not fields:
        return
    group = parser.add_argument_group(
        "server settings", "each sets the BENTOFORMERS_<NAME> environment variable of the server"
    )
    for name, field in fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        shown = "unset" if default is None else json.dumps(default) if isinstance(default, (tuple, dict)) else default
        described = (field.description or "").rstrip(".")
        help_text = f"{described} (default: {shown})" if described else f"default: {shown}"
        kwargs: dict[str, Any] = {"dest": f"setting_{name}", "default": None, "help": help_text}
        types = _types(field.annotation) - {type(None)}
        if field.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(field.annotation) is typing.Literal:
            kwargs["choices"] = typing.get_args(field.annotation)
        else:
            kwargs["metavar"] = "N" if types == {int} else "X" if types == {float} else "TEXT" if types == {str} else "JSON"
        group.add_argument(flag, **kwargs)


def serve_command(args: argparse.Namespace, host: str) -> tuple[list[str], dict[str, str]]:
    """The `bentoml serve` command line and environment that `bentoformers serve` runs."""
    env = serve_environment(args)
    cmd = [sys.executable, "-m", "bentoml", "serve", args.target, "--host", host, "--port", str(args.port)]
    if args.target == DEFAULT_TARGET:
        cmd += ["--working-dir", str(args.working_dir)]
    return cmd + args.bentoml_args, env


def serve_environment(args: argparse.Namespace) -> dict[str, str]:
    """This environment with the settings' flags as BENTOFORMERS_* variables."""
    env = dict(os.environ)
    for key, value in vars(args).items():
        if key.startswith("setting_") and value is not None:
            if isinstance(value, bool):
                value = "true" if value else "false"
            env["BENTOFORMERS_" + key.removeprefix("setting_").upper()] = str(value)
    return env


def _listen_host(args: argparse.Namespace, settings: Any, env: dict[str, str]) -> str:
    """--host when given; else loopback when the server would run open (no credentials), every interface when
    it asks for credentials or runs in a container (where loopback would reach no one)."""
    if args.host is not None:
        return args.host
    if env.get("BENTOML_CONTAINERIZED") == "true":
        return "0.0.0.0"
    from bentoformers.security.authenticator import startup_authenticator

    try:
        open_server = startup_authenticator(settings, containerized=False, announce=False) is None
    except (RuntimeError, OSError, ValueError):  # refused: the server says why when it starts
        open_server = False
    if not open_server:
        return "0.0.0.0"
    print("no credentials configured (the server runs open): listening on 127.0.0.1 only; pass --host 0.0.0.0 "
          "to serve other machines", file=sys.stderr)
    return "127.0.0.1"


def _serve(args: argparse.Namespace) -> int:
    _need("serve", "serve")
    env = serve_environment(args)
    settings = _check_settings(env)
    host = _listen_host(args, settings, env)
    cmd, env = serve_command(args, host)
    if args.target == DEFAULT_TARGET:
        if not (args.working_dir / "service.py").is_file():
            raise CliError(
                f"no service.py in {args.working_dir.resolve()}: run from the project folder, pass --working-dir, "
                "or serve a built bento by tag (bentoformers serve bentoformers:latest)"
            )
        from bentoformers.serving.store import served_models

        try:
            served = served_models(settings, base=args.working_dir)
        except (RuntimeError, OSError) as exc:
            raise CliError(str(exc)) from None
        names = ", ".join(f"{m.name} ({m.task}; {', '.join(sorted(m.variants))} built)" for m in served)
        print(f"serving {names} on http://{host}:{args.port}", file=sys.stderr)
    if args.dry_run:
        changed = {k: v for k, v in env.items() if k.startswith("BENTOFORMERS_") and os.environ.get(k) != v}
        print(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in sorted(changed.items())), *map(shlex.quote, cmd)]))
        return OK
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)  # bentoml takes over this process: signals reach it directly


def _check_settings(env: dict[str, str]) -> Any:
    from pydantic import ValidationError

    from bentoformers.settings import Settings

    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise CliError(f"invalid server setting: {problems}") from None
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ---- models -----------------------------------------------------------------------------------------------


def store_listing(every_version: bool = False) -> list[dict[str, Any]]:
    """Built models in the BentoML store with their labels and fidelity figures, newest first."""
    import bentoml

    rows = []
    for model in sorted(bentoml.models.list(), key=lambda m: m.info.creation_time, reverse=True):
        labels, metadata = model.info.labels, model.info.metadata
        if "task" not in labels:
            continue  # not built by bentoformers
        rows.append({
            "tag": str(model.tag),
            "name": model.tag.name,
            "task": labels.get("task"),
            "precision": labels.get("precision"),
            "source": labels.get("source"),
            "validation": metadata.get("validation", {}),
            "size_bytes": int(model.file_size),
            "created": model.info.creation_time.isoformat(timespec="seconds"),
        })
    if not every_version:
        latest: dict[str, dict[str, Any]] = {}
        for row in rows:
            latest.setdefault(row["name"], row)
        rows = list(latest.values())
    return rows


def _models(args: argparse.Namespace) -> int:
    _need("serve", "models")
    rows = store_listing(args.all)
    if args.json:
        print(json.dumps(rows, indent=2))
        return OK
    if not rows:
        print("The model store holds no bentoformers model; run `bentoformers build`.", file=sys.stderr)
        return OK
    table = [("TAG", "TASK", "PRECISION", "FIDELITY (vs fp32 PyTorch)", "SIZE", "CREATED")]
    for r in rows:
        fidelity = "  ".join(f"{k} {v:.5f}" for k, v in r["validation"].items()) or "-"
        table.append((r["tag"], r["task"], r["precision"], fidelity, _size(r["size_bytes"]), r["created"][:16]))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return OK


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


# ---- chat -------------------------------------------------------------------------------------------------


def _chat(args: argparse.Namespace) -> int:
    """Streams the model's answers: to MESSAGE, or turn by turn from stdin (the conversation kept)."""
    from bentoformers.client import BentoformersError, Client

    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = not args.message
    options = {"model": args.model, "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}
    with Client(args.url, api_key=args.api_key) as client:
        while True:
            if interactive:
                try:
                    line = input("> " if sys.stdin.isatty() else "")
                except EOFError:
                    return OK
                if not line.strip():
                    continue
            else:
                line = " ".join(args.message)
            messages.append({"role": "user", "content": line})
            answer = []
            try:
                for chunk in client.chat_stream(messages, **options):
                    answer.append(chunk.text)
                    print(chunk.text, end="", flush=True)
            except BentoformersError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return FAILED
            print()
            messages.append({"role": "assistant", "content": "".join(answer)})
            if not interactive:
                return OK


# ---- rerank -----------------------------------------------------------------------------------------------


def _rerank(args: argparse.Namespace) -> int:
    """The documents by relevance to the query, best first: score, index, document."""
    from bentoformers.client import BentoformersError, Client

    with Client(args.url, api_key=args.api_key) as client:
        try:
            results = client.rerank(args.query, args.documents, top_n=args.top_n, truncate=args.truncate or None,
                                    model=args.model)
        except BentoformersError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return FAILED
    for r in results:
        print(f"{r.score:.4f}  {r.index}  {args.documents[r.index]}")
    return OK


# ---- bench ------------------------------------------------------------------------------------------------


def _bench(args: argparse.Namespace) -> int:
    _need("bench", "bench")
    from bentoformers.tools import bench

    return bench.run(args)


# ---- parser -----------------------------------------------------------------------------------------------


def _csv_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="bentoformers", description=__doc__, epilog=EPILOG, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = sub.add_parser(
        "build",
        help="export, quantize, validate and store the models of a model list",
        description="For each model and variant: export to ONNX, optimise or quantize, validate against the "
        "fp32 PyTorch reference (natively, and int8 also under qemu for older CPU classes), and save into the "
        "BentoML model store. Up-to-date variants are skipped; a variant below its fidelity gate is not saved "
        "and the build says why; it exits with 1 only when a model is left with no saved variant (--strict: "
        "when any variant is refused).",
    )
    build.add_argument("--models", type=Path, default=DEFAULT_MODEL_LIST, help="model list (default: %(default)s)")
    build.add_argument("--only", nargs="+", metavar="NAME", help="build only these entries")
    build.add_argument("--force", action="store_true", help="rebuild even if an identical variant is stored")
    build.add_argument("--strict", action="store_true", help="exit 1 when any variant is refused (for pipelines)")
    build.set_defaults(func=_build)

    serve = sub.add_parser(
        "serve",
        help="serve the built models (bentoml serve with our settings)",
        description="Run `bentoml serve service:Gateway` from the project folder, with the settings below "
        "passed as BENTOFORMERS_* environment variables (flags win over the environment). Checks the "
        "settings and that the model is built before starting. Arguments after `--` go to bentoml serve.",
        epilog="example: bentoformers serve --port 3000 --max-queued-items 2048 -- --development",
        formatter_class=fmt,
    )
    serve.add_argument("target", nargs="?", default=DEFAULT_TARGET,
                       help="service import path or a built bento's tag (default: %(default)s)")
    serve.add_argument("--host", help="address to listen on (default: 0.0.0.0, or 127.0.0.1 when the server "
                       "would run open, without credentials)")
    serve.add_argument("--port", type=int, default=3000, help="(default: %(default)s)")
    serve.add_argument("--working-dir", type=Path, default=Path("."), help="the folder holding service.py")
    serve.add_argument("--dry-run", action="store_true", help="print the command and environment, do not run")
    _add_setting_flags(serve)
    serve.set_defaults(func=_serve, bentoml_args=[])

    models = sub.add_parser(
        "models",
        help="list the built models in the BentoML store",
        description="The bentoformers models in the BentoML store (BENTOML_HOME): task, precision, the "
        "fidelity figures measured against the fp32 PyTorch reference at build time, and size. "
        "`bentoml models get TAG` shows one in full.",
    )
    models.add_argument("--all", action="store_true", help="every stored version, not only the latest per model")
    models.add_argument("--json", action="store_true", help="machine-readable output")
    models.set_defaults(func=_models)

    _add_keys_parser(sub)

    chat = sub.add_parser(
        "chat",
        help="talk to a served chat model (/v1/chat/completions), the answer streamed",
        description="Send MESSAGE and stream the answer; without MESSAGE, read one turn per line from stdin and "
        "keep the conversation. The model's chat template turns the messages into its prompt.",
        epilog='example: bentoformers chat --model chat --system "Answer briefly." "Where did the cat sit?"',
    )
    chat.add_argument("message", nargs="*", help="the user message (default: turns from stdin)")
    chat.add_argument("--url", default=os.environ.get("BENTOFORMERS_URL", "http://localhost:3000"),
                      help="server root URL (default: $BENTOFORMERS_URL or %(default)s)")
    chat.add_argument("--model", help="a served generation model with a chat template (default: the server's)")
    chat.add_argument("--system", help="a system message first")
    chat.add_argument("--max-tokens", type=int, help="new tokens per answer at most (default: the server's)")
    chat.add_argument("--temperature", type=float, help="0: greedy (default: 1)")
    chat.add_argument("--seed", type=int, help="for reproducible sampling")
    chat.add_argument("--api-key", default=os.environ.get("BENTOFORMERS_API_KEY"),
                      help="Bearer token (default: $BENTOFORMERS_API_KEY)")
    chat.set_defaults(func=_chat)

    rerank = sub.add_parser(
        "rerank",
        help="rank documents by relevance to a query with a served reranker (/rerank)",
        description="Score each DOCUMENT with QUERY and print them best first: relevance score (the sigmoid "
        "of the model's logit), the document's position among the arguments, the document.",
        epilog='example: bentoformers rerank "night trains" "The sleeper leaves at ten." "Cats purr."',
    )
    rerank.add_argument("query")
    rerank.add_argument("documents", nargs="+", metavar="DOCUMENT")
    rerank.add_argument("--top-n", type=int, help="only the n best")
    rerank.add_argument("--truncate", action="store_true", help="cut pairs over the model's token limit")
    rerank.add_argument("--model", help="a served rerank model (default: the server's first)")
    rerank.add_argument("--url", default=os.environ.get("BENTOFORMERS_URL", "http://localhost:3000"),
                        help="server root URL (default: $BENTOFORMERS_URL or %(default)s)")
    rerank.add_argument("--api-key", default=os.environ.get("BENTOFORMERS_API_KEY"),
                        help="Bearer token (default: $BENTOFORMERS_API_KEY)")
    rerank.set_defaults(func=_rerank)

    bench = sub.add_parser(
        "bench",
        help="closed-loop load sweep against a server: throughput, latency, errors, memory",
        description="Drive an embeddings endpoint with closed-loop clients (each sends its next request when "
        "the last is answered) at every concurrency and request size given, after a warm-up. Reports "
        "texts/s, p50/p95/p99 latency, errors by status and, for a server on this machine, its memory; "
        "writes the figures as JSON and a PNG plot. Without URL it starts `bentoml serve` here.",
        epilog="examples:\n"
        "  bentoformers bench                                    serve locally and sweep the defaults\n"
        "  bentoformers bench http://host:3000 -c 1,8,32 -n 1,16  our server, native /embed\n"
        "  bentoformers bench http://peer:7997 --api openai --path /embeddings --model m\n"
        "  bentoformers bench --generation                       streamed completions of a GPT-2 it builds\n"
        "  bentoformers bench --rerank http://host:3000           1 query x 32 documents at concurrency 1 and 8\n",
        formatter_class=fmt,
    )
    bench.add_argument("url", nargs="?", help="server root URL (default: start a local server)")
    bench.add_argument("--api", choices=("native", "openai"), default="native",
                       help="native: POST /embed; openai: POST /v1/embeddings (default: %(default)s)")
    bench.add_argument("--path", help="route to post to, for servers that put it elsewhere")
    bench.add_argument("--model", help="model name to send")
    bench.add_argument("--api-key", default=os.environ.get("BENTOFORMERS_API_KEY"),
                       help="Bearer token (default: $BENTOFORMERS_API_KEY)")
    bench.add_argument("-c", "--concurrency", type=_csv_ints, metavar="N,N",
                       help="clients in flight (default: 1,4,16,64; with --generation 1,4,16; with --rerank 1,8)")
    bench.add_argument("-n", "--texts-per-request", type=_csv_ints, metavar="N,N",
                       help="request sizes (default: 1,32; with --rerank, documents per query: 32)")
    bench.add_argument("--duration", type=float, default=5.0, help="seconds per point (default: %(default)s)")
    bench.add_argument("--warmup", type=float, default=2.0,
                       help="seconds of unrecorded load per request size first (default: %(default)s)")
    bench.add_argument("--texts", type=Path, help="a file with one text per line (default: 400 shipped sentences)")
    bench.add_argument("--timeout", type=float, default=60.0, help="per request, seconds (default: %(default)s)")
    bench.add_argument("--honour-retry-after", action="store_true",
                       help="a refused client (429/503) waits the server's Retry-After before its next request, as "
                       "SDKs do (default: it sends again at once, the harshest load)")
    bench.add_argument("--server-pid", type=int, help="pid of the server, for memory (default: found by port)")
    bench.add_argument("--in-process", action="store_true",
                       help="also measure the built model in this process: the ceiling the server is compared with")
    bench.add_argument("--model-only", action="store_true",
                       help="only time the built int8 and fp32 variants in process (no server), as the service runs them")
    bench.add_argument("--generation", action="store_true",
                       help="stream /v1/completions instead (TTFT, inter-token latency, tokens/s); without URL it "
                       "builds and serves a small GPT-2 of its own, and times it decoding alone in process too")
    bench.add_argument("--rerank", action="store_true",
                       help="POST /rerank instead: one query with N documents per request, in pairs/s, beside the "
                       "served reranker scoring the same pairs in process (JSON only, no plot)")
    bench.add_argument("--max-tokens", type=int, default=32, help="per completion, with --generation (default: %(default)s)")
    bench.add_argument("--json", type=Path, default=Path("bench-results/bench.json"), help="(default: %(default)s)")
    bench.add_argument("--plot", type=Path, default=Path("bench-results/bench.png"), help="(default: %(default)s)")
    bench.set_defaults(func=_bench)
    return parser


def _version() -> str:
    from bentoformers import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    passthrough: list[str] = []
    if "--" in argv:  # for `serve`: the rest goes to bentoml serve
        at = argv.index("--")
        argv, passthrough = argv[:at], argv[at + 1 :]
    args = build_parser().parse_args(argv)
    if passthrough:
        if args.command != "serve":
            print(f"error: `--` passes arguments to bentoml serve only, not to {args.command}", file=sys.stderr)
            return USAGE
        args.bentoml_args = passthrough
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
