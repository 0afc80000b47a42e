"""``otel-disconnect sim --port 8001 --ttft 0.2 --tokens-per-second 50 ...``: the
OpenAI-compatible LLM simulator (``otel_disconnect.tools.llm_sim``) on uvicorn."""

from __future__ import annotations

import argparse
from typing import Any

from otel_disconnect.tools.llm_sim.engine import SimConfig


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sim",
        help="serve the OpenAI-compatible LLM simulator",
        description="OpenAI-compatible LLM simulator exporting vLLM-named metrics.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--model", default=SimConfig.model)
    p.add_argument("--ttft", type=float, default=SimConfig.ttft, help="seconds to first token")
    p.add_argument("--tokens-per-second", type=float, default=SimConfig.tokens_per_second)
    p.add_argument("--max-tokens", type=int, default=SimConfig.max_tokens,
                   help="output length of a response (a request's max_tokens can cut it)")
    p.add_argument("--max-num-seqs", type=int, default=SimConfig.max_num_seqs,
                   help="requests generating at once; more wait (vllm:num_requests_waiting)")
    p.add_argument("--kv-cache-tokens", type=int, default=SimConfig.kv_cache_tokens)
    p.add_argument("--keep-generating-after-disconnect", action="store_true",
                   help="finish generating after the client left (a gateway that does not "
                        "propagate cancellation); default: abort")
    p.add_argument("--no-otel-disconnect", action="store_true",
                   help="serve without DisconnectMiddleware (by default it is added as "
                        "`vllm serve --middleware otel_disconnect.DisconnectMiddleware` would, "
                        "and /metrics shows its otel_disconnect_* series beside vllm:*)")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = SimConfig(
        model=args.model, ttft=args.ttft, tokens_per_second=args.tokens_per_second,
        max_tokens=args.max_tokens, max_num_seqs=args.max_num_seqs,
        kv_cache_tokens=args.kv_cache_tokens,
        keep_generating_after_disconnect=args.keep_generating_after_disconnect,
    )
    import uvicorn
    from prometheus_client import REGISTRY

    from otel_disconnect.tools.llm_sim.app import create_app
    from otel_disconnect.tools.llm_sim.engine import Simulator

    # One registry for the vllm:* series and the middleware's: one /metrics, one scrape job.
    app = create_app(simulator=Simulator(config, registry=REGISTRY),
                     instrument=not args.no_otel_disconnect)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
