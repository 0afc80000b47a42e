"""An OpenAI-compatible LLM simulator exporting vLLM-named metrics.

Run it with ``otel-disconnect sim``.

Deterministic tokens (``tok0 tok1 ...``, one per SSE chunk) at a configured time to first token
and rate, with a ground-truth record per request for tests and demos. Needs Starlette and
uvicorn (``pip install 'otel-disconnect[demo]'``).
"""

from otel_disconnect.tools.llm_sim.app import create_app
from otel_disconnect.tools.llm_sim.engine import Generation, Record, SimConfig, Simulator

__all__ = ["Generation", "Record", "SimConfig", "Simulator", "create_app"]
