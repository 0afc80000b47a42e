"""Token accounting for LLM traffic: ``record_tokens()``, the app's own OpenAI-compatible
responses, and upstream streams read with httpx. See ``account`` for the rules."""

from .tokens import record_tokens

__all__ = ["instrument_upstreams", "record_tokens"]


def instrument_upstreams() -> bool:
    """Count upstream OpenAI-compatible responses read with httpx; False without httpx."""
    from .httpx_upstream import instrument_httpx
    from .sglang_engine import instrument_sglang_engine
    from .vllm_engine import instrument_vllm_engine

    instrument_vllm_engine()  # inside vLLM's API server: count the engine's tokens
    instrument_sglang_engine()  # inside SGLang's HTTP server: likewise
    return instrument_httpx()
