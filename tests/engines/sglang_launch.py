"""SGLang's own launcher, with only its scheduler and detokenizer processes fake (.matrix/).

    [opentelemetry-instrument] python tests/engines/sglang_launch.py {module,serve} WORKDIR
        TOKENS_PER_STEP STEP_S QUEUE_S MAX_TOKENS -- SGLANG_ARGUMENTS

``module`` runs ``python -m sglang.launch_server SGLANG_ARGUMENTS`` (that module's ``__main__``
block, through ``runpy``), ``serve`` runs ``sglang serve SGLANG_ARGUMENTS`` (``sglang.cli.main``,
the ``sglang`` command). ``{model}`` in the arguments is the tiny model this script writes to
``WORKDIR/tiny`` (a tokenizer and a config, no weights); the fake scheduler writes its truth to
``WORKDIR/truth.json``.

Both parse the command line with SGLang's own parser (``prepare_server_args``) and end in
``http_server.launch_server(server_args)``; its parameters ``run_scheduler_process_func`` and
``run_detokenizer_process_func`` (SGLang's override points, defaulting to the real
``run_scheduler_process`` and ``run_detokenizer_process``) are given ``sglang_fake``'s instead:
the one change, made by replacing ``http_server.launch_server`` with a wrapper (so the module is
imported a moment earlier than in a real launch, before the arguments are parsed). Everything
else is SGLang's: ``Engine._launch_subprocesses`` and its ``multiprocessing`` spawn of the two
processes (which find the fakes by qualified name), the wait for the scheduler's ready message on
its pipe, the tokenizer manager, the subprocess watchdog, the HTTP server, the warm-up request,
the SIGTERM drain (``ShutdownReq`` to the scheduler, then ``kill_process_tree``) and the
``kill_process_tree`` when the launcher returns. ``--device cpu`` is SGLang's own option.
"""

from __future__ import annotations

import functools
import os
import runpy
import sys
from pathlib import Path
from typing import Any

from tests.engines import sglang_fake


def main() -> None:
    mode, workdir, per_step, step_s, queue_s, max_tokens, separator, *arguments = sys.argv[1:]
    assert mode in ("module", "serve") and separator == "--", sys.argv
    work = Path(workdir)
    model = sglang_fake.tiny_model(work / "tiny")
    os.environ["SGLANG_FAKE_TRUTH"] = str(work / "truth.json")  # the spawned children read it
    arguments = [a.replace("{model}", str(model)) for a in arguments]
    config = sglang_fake.Config(int(per_step), float(step_s), float(queue_s), int(max_tokens))

    from sglang.srt.entrypoints import http_server

    real_launch_server = http_server.launch_server

    def launch_server(server_args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault(
            "run_scheduler_process_func",
            functools.partial(sglang_fake.run_scheduler_process, config),
        )
        kwargs.setdefault("run_detokenizer_process_func", sglang_fake.run_detokenizer_process)
        return real_launch_server(server_args, **kwargs)

    http_server.launch_server = launch_server
    if mode == "module":
        sys.argv = ["-m", *arguments]  # runpy puts the module's path first, as `python -m`
        runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)
    else:
        from sglang.cli.main import main as sglang_main

        sys.argv = ["sglang", "serve", *arguments]
        sglang_main()


if __name__ == "__main__":  # not in the spawned children, which import this as __mp_main__
    main()
