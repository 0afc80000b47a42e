"""SGLang's scheduler and detokenizer, faked, in the SGLang environment (.matrix/).

No model and no GPU: ``FakeScheduler`` sits on the tokenizer manager's ZMQ endpoints, takes its
requests (``sock_recv``), sends, per request, a ``BatchStrOutput`` with ``TOKENS_PER_STEP`` token
ids every ``STEP_S`` seconds after ``QUEUE_S`` in its waiting queue, honours ``AbortReq`` as
SGLang's scheduler does (queued: dropped and echoed back; running: one last output with an
``abort`` finish reason), stops on ``ShutdownReq`` and records its ground truth (tokens, their
times, the abort).

Two uses: a thread in the HTTP process (``sglang_server.py``: it sends straight to the tokenizer
manager), and the processes SGLang's own launcher spawns (``sglang_launch.py``):
``run_scheduler_process`` and ``run_detokenizer_process`` take the arguments of SGLang's
(``sglang.srt.managers.scheduler.run_scheduler_process``, ``...detokenizer_manager.
run_detokenizer_process``), are found by qualified name in the spawned children, and keep the
real layout: tokenizer manager → scheduler → detokenizer → tokenizer manager. The fake scheduler
sends its ready message down the launcher's pipe as the real one does (``status``,
``max_req_input_len``, ``startup_time``), then sends its outputs to the detokenizer; the fake
detokenizer passes them on unchanged (they are already text). The truth is written to a JSON file
(replaced whole) whenever it changes.
"""

from __future__ import annotations

import json
import os
import threading
import time
from array import array
from pathlib import Path
from typing import Any, NamedTuple

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


class Config(NamedTuple):
    tokens_per_step: int
    step_s: float
    queue_s: float
    max_tokens: int


class FakeScheduler(threading.Thread):
    """The scheduler's place: requests from ``inbox`` (the tokenizer manager's), outputs to
    ``outbox`` (the tokenizer manager's, or the detokenizer's in the launcher's layout)."""

    def __init__(self, inbox: str, outbox: str, config: Config) -> None:
        super().__init__(name="fake-scheduler", daemon=True)
        import zmq

        context = zmq.Context()
        self.recv = context.socket(zmq.PULL)
        self.recv.connect(inbox)
        self.send = context.socket(zmq.PUSH)
        self.send.connect(outbox)
        self.tokens_per_step = config.tokens_per_step
        self.step_s = config.step_s
        self.queue_s = config.queue_s
        self.max_tokens = config.max_tokens
        self.changed = threading.Event()  # set by every change to the truth
        self.lock = threading.Lock()
        self.truth: dict[str, dict[str, Any]] = {}
        self.waiting: dict[str, float] = {}  # rid -> when it leaves the queue
        self.running: dict[str, float] = {}  # rid -> its next step
        self.aborting: set[str] = set()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return json.loads(json.dumps(self.truth))

    def run(self) -> None:
        from sglang.srt.managers.io_struct import AbortReq, ShutdownReq, sock_recv

        while True:
            now = time.monotonic()
            due = [*self.waiting.values(), *self.running.values()]
            timeout = max(0.0, min(due) - now) if due else 0.05
            if self.recv.poll(int(timeout * 1000) + 1):
                obj = sock_recv(self.recv)
                if isinstance(obj, ShutdownReq):  # SGLang's SIGTERM drain, as its scheduler
                    return
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
        self.changed.set()

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
            self.changed.set()

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
        self.changed.set()


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


def run_scheduler_process(  # noqa: PLR0917 (SGLang calls it with its own positional signature)
    config: Config,
    server_args: Any,
    port_args: Any,
    gpu_id: int,
    tp_rank: int,
    pp_rank: int,
    dp_rank: int | None,
    pipe_writer: Any,
) -> None:
    """SGLang's ``run_scheduler_process`` faked (``config`` first: the launcher binds it with
    ``functools.partial``): the ready message down ``pipe_writer``, then the fake's loop, its
    outputs to the detokenizer, its truth in ``$SGLANG_FAKE_TRUTH``."""
    import setproctitle

    setproctitle.setproctitle("sglang::scheduler")  # how SGLang's shutdown finds its schedulers
    scheduler = FakeScheduler(
        port_args.scheduler_input_ipc_name, port_args.detokenizer_ipc_name, config
    )
    truth = Path(os.environ["SGLANG_FAKE_TRUTH"])
    writer = threading.Thread(target=_write_truth, args=(scheduler, truth), daemon=True)
    writer.start()
    scheduler.start()
    pipe_writer.send(
        {
            "status": "ready",
            "max_total_num_tokens": 1 << 20,
            "max_req_input_len": 4000,
            "startup_time": None,
        }
    )
    scheduler.join()


def _write_truth(scheduler: FakeScheduler, path: Path) -> None:
    part = path.with_suffix(".part")
    while True:
        scheduler.changed.wait()
        scheduler.changed.clear()
        part.write_text(json.dumps(scheduler.snapshot()))
        part.replace(path)


def run_detokenizer_process(server_args: Any, port_args: Any) -> None:
    """SGLang's ``run_detokenizer_process`` faked: the scheduler's outputs (already text) passed
    on to the tokenizer manager, on the real detokenizer's sockets (it binds its own, connects to
    the tokenizer manager's)."""
    import setproctitle
    import zmq

    setproctitle.setproctitle("sglang::detokenizer")
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    inbox.bind(port_args.detokenizer_ipc_name)
    outbox = context.socket(zmq.PUSH)
    outbox.connect(port_args.tokenizer_ipc_name)
    zmq.proxy(inbox, outbox)
