"""SGLang's HTTP server with a fake scheduler, run in the SGLang environment (.matrix/).

Real SGLang code: ``ServerArgs`` and their resolution and checks, ``PortArgs``,
``init_tokenizer_manager`` (the ``TokenizerManager`` with a tokenizer and model config that this
script writes: a word-level tokenizer, a one-layer Llama ``config.json``, no weights), its ZMQ
sockets, ``generate_request`` / ``_wait_one_response`` / ``abort_request``, and
``http_server._setup_and_run_http_server`` (what ``launch_server`` calls once its subprocesses
are up): the module's FastAPI ``app``, its lifespan and routes, run by SGLang's own uvicorn call.
Fake: the scheduler and detokenizer (no model, no GPU), a thread on the other ends of the
tokenizer manager's ZMQ sockets that sends, per request, a ``BatchStrOutput`` with
``TOKENS_PER_STEP`` token ids every ``STEP_S`` seconds after ``QUEUE_S`` in its waiting queue,
honours ``AbortReq`` as SGLang's scheduler does (queued: dropped and echoed back; running: one
last output with an ``abort`` finish reason) and records its ground truth (tokens, their times,
the abort), served at ``GET /truth``.

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

import json
import sys
import tempfile
import threading
import time
from array import array
from pathlib import Path
from typing import Any

MODEL = "fake-sglang"


def tiny_model(directory: Path) -> Path:
    """A tokenizer (words ``t0`` … ``t999``) and a model config; no weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hi": 3}
    vocab.update({f"t{i}": i for i in range(4, 1000)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "[UNK]",
        "model_max_length": 4096,
        "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    model = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "vocab_size": 1000,
        "max_position_embeddings": 4096,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "rms_norm_eps": 1e-5,
    }
    (directory / "config.json").write_text(json.dumps(model))
    return directory


class FakeScheduler(threading.Thread):
    """The scheduler's and detokenizer's place, on the tokenizer manager's ZMQ endpoints."""

    def __init__(
        self,
        port_args: Any,
        tokens_per_step: int,
        step_s: float,
        queue_s: float,
        max_tokens: int,
    ) -> None:
        super().__init__(name="fake-scheduler", daemon=True)
        import zmq

        context = zmq.Context()
        self.recv = context.socket(zmq.PULL)
        self.recv.connect(port_args.scheduler_input_ipc_name)
        self.send = context.socket(zmq.PUSH)
        self.send.connect(port_args.tokenizer_ipc_name)
        self.tokens_per_step = tokens_per_step
        self.step_s = step_s
        self.queue_s = queue_s
        self.max_tokens = max_tokens
        self.lock = threading.Lock()
        self.truth: dict[str, dict[str, Any]] = {}
        self.waiting: dict[str, float] = {}  # rid -> when it leaves the queue
        self.running: dict[str, float] = {}  # rid -> its next step
        self.aborting: set[str] = set()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return json.loads(json.dumps(self.truth))

    def run(self) -> None:
        from sglang.srt.managers.io_struct import AbortReq, sock_recv

        while True:
            now = time.monotonic()
            due = [*self.waiting.values(), *self.running.values()]
            timeout = max(0.0, min(due) - now) if due else 0.05
            if self.recv.poll(int(timeout * 1000) + 1):
                obj = sock_recv(self.recv)
                if isinstance(obj, AbortReq):
                    self.abort(obj)
                elif getattr(obj, "rid", None) is not None:
                    self.admit(obj.rid)
            now = time.monotonic()
            for rid, at in list(self.waiting.items()):
                if at <= now:
                    del self.waiting[rid]
                    self.running[rid] = now + self.step_s
            for rid, at in list(self.running.items()):
                if at <= now:
                    self.step(rid)

    def admit(self, rid: str) -> None:
        with self.lock:
            self.truth[rid] = {
                "tokens": 0,
                "times": [],
                "aborted_at": None,  # when the AbortReq came
                "finished": False,  # ran to its length
                "ended": False,  # its last output (or the queued-abort echo) was sent
            }
        self.waiting[rid] = time.monotonic() + self.queue_s

    def abort(self, req: Any) -> None:
        from sglang.srt.managers.io_struct import AbortReq, sock_send

        for rid in [*self.waiting, *self.running]:
            if not (req.abort_all or rid.startswith(req.rid)):
                continue
            with self.lock:
                self.truth[rid]["aborted_at"] = time.time()
            if rid in self.waiting:  # never ran: dropped, and the tokenizer manager told
                del self.waiting[rid]
                sock_send(self.send, AbortReq(rid=rid))
                with self.lock:
                    self.truth[rid]["ended"] = True
            else:  # finishes with an abort reason at its next step
                self.aborting.add(rid)

    def step(self, rid: str) -> None:
        from sglang.srt.managers.io_struct import sock_send

        record = self.truth[rid]
        n = min(self.tokens_per_step, self.max_tokens - record["tokens"])
        first = 4 + record["tokens"]
        ids = list(range(first, first + n))
        with self.lock:
            record["tokens"] += n
            record["times"].append(time.time())
        finish: dict[str, Any] | None = None
        if rid in self.aborting:
            self.aborting.discard(rid)
            finish = {"type": "abort", "message": "Abort before decoding."}
        elif record["tokens"] >= self.max_tokens:
            finish = {"type": "length", "length": self.max_tokens}
            with self.lock:
                record["finished"] = True
        if finish is None:
            self.running[rid] = time.monotonic() + self.step_s
        else:
            del self.running[rid]
        sock_send(self.send, batch_output(rid, ids, record["tokens"], finish))
        if finish is not None:
            with self.lock:
                record["ended"] = True


def batch_output(rid: str, ids: list[int], completion: int, finish: Any) -> Any:
    """A detokenizer's ``BatchStrOutput`` for one request: the step's token ids and text."""
    import msgspec
    from sglang.srt.managers.io_struct import BatchStrOutput

    fields = {f.name: None for f in msgspec.structs.fields(BatchStrOutput) if f.required}
    fields.update(
        rids=[rid],
        finished_reasons=[finish],
        output_strs=["".join(f"t{t} " for t in ids)],
        output_ids=[array("i", ids)],
        prompt_tokens=[1],
        completion_tokens=[completion],
        reasoning_tokens=[0],
        cached_tokens=[0],
        retraction_counts=[0],
        routed_experts=None,
        indexer_topk=None,
        placeholder_tokens_idx=None,
        placeholder_tokens_val=None,
    )
    for name in (
        "input_token_logprobs_val",
        "input_token_logprobs_idx",
        "output_token_logprobs_val",
        "output_token_logprobs_idx",
        "input_top_logprobs_val",
        "input_top_logprobs_idx",
        "output_top_logprobs_val",
        "output_top_logprobs_idx",
        "input_token_ids_logprobs_val",
        "input_token_ids_logprobs_idx",
        "output_token_ids_logprobs_val",
        "output_token_ids_logprobs_idx",
        "output_hidden_states",
    ):
        fields[name] = [[]]
    return BatchStrOutput(**fields)


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
    scheduler = FakeScheduler(
        port_args, int(per_step), float(step_s), float(queue_s), int(max_tokens)
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
