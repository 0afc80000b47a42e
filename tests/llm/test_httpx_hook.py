"""The upstream counting patch reaches httpx however late the app imports it, and never imports
httpx itself: an app that does not use it does not carry its modules (run in a fresh
interpreter, since this test process has imported httpx long ago)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    from otel_disconnect.llm import httpx_upstream as hook

    def patched(mod):
        return hasattr(mod.AsyncClient.send, hook._MARK) and hasattr(mod.Client.send, hook._MARK)

    assert hook.instrument_httpx() is True
    assert "httpx" not in sys.modules, "instrument_httpx() imported httpx"

    import httpx  # the app imports it later (as under opentelemetry-instrument)
    assert patched(httpx), "a late import of httpx was not patched"

    hook.uninstrument_httpx()
    assert not patched(httpx)
    assert hook.instrument_httpx() is True  # again: the hook is not registered twice
    assert patched(httpx)
    assert httpx.AsyncClient.send.__dict__[hook._MARK].__qualname__ == "AsyncClient.send"
    print("ok")
    """
)


def test_httpx_patched_when_imported_after_instrumenting() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_uninstrumented_before_import_stays_unpatched() -> None:
    script = textwrap.dedent(
        """
        from otel_disconnect.llm import httpx_upstream as hook
        hook.instrument_httpx()
        hook.uninstrument_httpx()
        import httpx
        assert not hasattr(httpx.AsyncClient.send, hook._MARK)
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
