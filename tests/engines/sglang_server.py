"""SGLang's HTTP server with a fake scheduler, run in the SGLang environment (.matrix/).

Real SGLang code: ``ServerArgs`` and their resolution and checks, ``PortArgs``,
``init_tokenizer_manager`` (the ``TokenizerManager`` with a tokenizer and model config that this
script writes: a word-level tokenizer, a one-layer Llama ``config.json``, no weights), its ZMQ
sockets, ``generate_request`` / ``_wait_one_response`` / ``abort_request``, and
``http_server._setup_and_run_http_server`` (what ``launch_server`` calls once its subprocesses
are up): the module's FastAPI ``app``, its lifespan and routes, run by SGLang's own uvicorn call.
Fake: the scheduler and detokenizer (no model, no GPU), ``sglang_fake.FakeScheduler`` as a
thread on the other ends of the tokenizer manager's ZMQ sockets, its ground truth (tokens, their
times, the abort) served at ``GET /truth``.

    [opentelemetry-instrument] python tests/engines/sglang_server.py PORT TOKENS_PER_STEP STEP_S
        QUEUE_S MAX_TOKENS [--enable-metrics] [--middleware]

The middleware comes from ``opentelemetry-instrument`` (the package's instrumentor entry point,
which patches SGLang when it is imported); run without it, the server has none (the
byte-identity check), unless ``--middleware``: then this script adds it with
``app.add_middleware`` once the tokenizer manager exists, as a launcher script would, so SGLang
is patched late (when the middleware is built, at start-up), and the package's metrics are
served at ``/metrics``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.engines.sglang_fake import MODEL, Config, FakeScheduler, tiny_model


def main() -> None:
    port, per_step, step_s, queue_s, max_tokens = sys.argv[1:6]
    enable_metrics = "--enable-metrics" in sys.argv[6:]
    add_middleware = "--middleware" in sys.argv[6:]
    model = tiny_model(Path(tempfile.mkdtemp()) / "tiny")

    from sglang.srt.entrypoints import http_server
    from sglang.srt.entrypoints.engine import _set_envs_and_config, init_tokenizer_manager
    from sglang.srt.parser.template_detection import resolve_auto_parsers
    from sglang.srt.plugins import load_plugins
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import PortArgs, ServerArgs
    from sglang.srt.utils import configure_logger

    # As Engine._launch_subprocesses prepares them for launch_server.
    server_args = ServerArgs(
        model_path=str(model),
        served_model_name=MODEL,
        device="cpu",
        host="127.0.0.1",
        port=int(port),
        skip_server_warmup=True,
        enable_metrics=enable_metrics,
        log_level="error",  # not the warm-up thread's /freeze_gc, posted before uvicorn listens
    )
    configure_logger(server_args)
    server_args.resolve_once()
    _set_envs_and_config(server_args)
    load_plugins()
    server_args.check_server_args()
    resolve_auto_parsers(server_args)
    publish(server_args, role="tokenizer")
    port_args = PortArgs.init_new(server_args)

    tokenizer_manager, template_manager = init_tokenizer_manager(server_args, port_args)
    config = Config(int(per_step), float(step_s), float(queue_s), int(max_tokens))
    scheduler = FakeScheduler(
        port_args.scheduler_input_ipc_name, port_args.tokenizer_ipc_name, config
    )
    scheduler.start()
    tokenizer_manager.max_req_input_len = 4000

    @http_server.app.get("/truth")
    async def truth() -> Any:
        return scheduler.snapshot()

    if add_middleware:
        from otel_disconnect import DisconnectMiddleware, metrics_app

        http_server.app.add_middleware(DisconnectMiddleware)
        http_server.app.mount("/metrics", metrics_app())

    http_server._setup_and_run_http_server(
        server_args,
        tokenizer_manager,
        template_manager,
        port_args,
        [{"max_req_input_len": 4000}],
        None,
    )


if __name__ == "__main__":
    main()
