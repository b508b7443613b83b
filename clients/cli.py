"""The `shardgate` command: serve, generate, demo."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import grpc

from shardgate.clients.client import Client

DEMO_PROMPT = "The quick brown fox"


def _generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: server's 1.0)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")


def _params(args: argparse.Namespace) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


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


def generate(args: argparse.Namespace) -> int:
    with Client(args.addr, timeout=args.timeout) as client:
        try:
            _print_generation(client, args.prompt, _params(args), args.stream)
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    return 0


def demo(args: argparse.Namespace) -> int:
    """Starts a server on the built-in model, streams one generation from it, stops it."""
    from shardgate.server.launcher import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "shardgate.clients.cli", "serve", "--port", str(port), "--model", args.model])
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 300
            while True:  # UNAVAILABLE until the model has loaded
                try:
                    info = client.model_info()
                    break
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.UNAVAILABLE or server.poll() is not None or time.monotonic() > deadline:
                        print(f"error: the server did not start ({error.code().name})", file=sys.stderr)
                        return 1
                    time.sleep(0.2)
            print(f"[serving {info.model} ({info.model_type}, {info.dtype}) on 127.0.0.1:{port}]", file=sys.stderr)
            print(args.prompt, end="")
            _print_generation(client, args.prompt, _params(args), stream=True)
    finally:
        server.terminate()
        server.wait(30)
    return 0


def main(argv: list[str] | None = None) -> int:
    from shardgate.server import cli as server_cli  # flags and config only: no server dependencies

    parser = argparse.ArgumentParser(prog="shardgate", description="gRPC inference for model-parallel language models")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway and its shard processes")
    server_cli.add_arguments(serve)
    serve.set_defaults(func=server_cli.run)

    gen = commands.add_parser("generate", help="generate text from a running server")
    gen.add_argument("prompt")
    gen.add_argument("--addr", default="127.0.0.1:50051")
    gen.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    gen.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    _generation_arguments(gen)
    gen.set_defaults(func=generate)

    dem = commands.add_parser("demo", help="start a server on the built-in model and stream a generation")
    dem.add_argument("prompt", nargs="?", default=DEMO_PROMPT)
    dem.add_argument("--model", default="builtin:tiny")
    _generation_arguments(dem)
    dem.set_defaults(func=demo)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
