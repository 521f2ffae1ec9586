"""`deepseek-server serve ...` and `deepseek-server make-tiny-model --arch ARCH OUT`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from deepseek_server.settings import ServerSettings
from deepseek_server.tiny_model import ARCHITECTURES


def _serve_parser(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the OpenAI-compatible server",
                           description="Every flag also reads DEEPSEEK_<FLAG_IN_CAPS> from the environment.")
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = (field.description or "") + f" [env DEEPSEEK_{name.upper()}]"
        if field.annotation is bool:
            serve.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
        elif name == "auth":
            serve.add_argument(flag, choices=["required", "disabled"], default=argparse.SUPPRESS,
                               help="'disabled' turns off API keys and limits (local testing only)" + help_text)
        elif name == "engine":
            serve.add_argument(flag, choices=["builtin", "vllm"], default=argparse.SUPPRESS, help=help_text)
        elif name == "precision":
            serve.add_argument(flag, choices=["bf16", "fp16", "fp32", "int8"], default=argparse.SUPPRESS,
                               help=help_text)
        else:
            serve.add_argument(flag, default=argparse.SUPPRESS, help=help_text)


def serve(options: dict[str, Any]) -> int:
    try:
        settings = ServerSettings(**options)
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "settings"
            print(f"deepseek-server: {where}: {error['msg']}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from deepseek_server.app import create_app
    from deepseek_server.draining import ConnectionCloseWhenDraining, Draining, DrainingServer
    from deepseek_server.http_protocol import OpenAIErrorsHTTPProtocol

    draining = Draining()
    api = create_app(settings)
    # the grace with its fraction (uvicorn's hint says int; its wait, asyncio.timeout, takes seconds as a float)
    config = uvicorn.Config(ConnectionCloseWhenDraining(api, draining), host=settings.host, port=settings.port,
                            log_level=settings.log_level, timeout_graceful_shutdown=settings.shutdown_grace_s,
                            lifespan="on", timeout_keep_alive=settings.keep_alive_s, access_log=False,
                            http=OpenAIErrorsHTTPProtocol,  # its own 400s in OpenAI's shape too
                            server_header=False)  # no `server: uvicorn`: responses do not name the software
    services = api.state.services

    async def end_running_requests() -> None:
        """The grace is nearly over: the builtin engine stops its rows, so streams end with `finish_reason: length`
        and `[DONE]` (a relayed stream is vLLM's, left to uvicorn's timeout)."""
        services.shutting_down = True
        if services.engine is not None and settings.engine == "builtin":
            await services.engine.stop()

    server = DrainingServer(config, draining, settings.drain_idle_s, on_grace_over=end_running_requests)

    def stop() -> None:  # a model that cannot be loaded will not be served by waiting: exit, and let a restart retry
        server.should_exit = True

    services.on_load_failure = stop
    server.run()
    if services.load_error is not None:
        # the last line of the log: what Kubernetes shows as the reason (terminationMessagePolicy FallbackToLogsOnError)
        reason = " ".join(services.load_error.split())  # one line, whatever the exception's message holds
        print(f"deepseek-server: the model could not be loaded: {reason}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepseek-server")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    tiny = sub.add_parser("make-tiny-model", help="write a tiny random-weight model and tokenizer (no download)")
    tiny.add_argument("--arch", choices=ARCHITECTURES, default="llama")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.add_argument("--layers", type=int, default=2, help="number of decoder layers")
    tiny.add_argument("--heads", type=int, default=2, help="attention heads (head_dim = hidden size / heads)")
    tiny.add_argument("--kv-heads", type=int, default=1, help="key/value heads (grouped-query attention)")
    tiny.add_argument("--intermediate-size", type=int, default=128)
    tiny.add_argument("--max-len", type=int, default=512, help="context length (max_position_embeddings)")
    tiny.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "make-tiny-model":
        from deepseek_server.tiny_model import ModelSize, make_tiny_model

        try:
            size = ModelSize(hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                             num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                             intermediate_size=args.intermediate_size)
        except ValueError as exc:
            parser.error(str(exc))
        make_tiny_model(args.arch, args.out, seed=args.seed, max_len=args.max_len, size=size)
        print(f"wrote a tiny {args.arch} model (hidden {size.hidden_size}, {size.num_hidden_layers} layers, "
              f"head_dim {size.head_dim}) to {args.out}")
        return 0
    options = {k: v for k, v in vars(args).items() if k != "command"}
    return serve(options)


if __name__ == "__main__":
    sys.exit(main())
