"""OpenAI-compatible serving: `create_app(llm)` builds the FastAPI app; EngineRunner drives the engine.

- protocol.py: request models, error bodies, SSE framing.
- runner.py: the background engine thread, its inbox and the per-request asyncio queues.
- app.py: the routes (/health, /v1/models, /v1/completions, /v1/chat/completions).
- commands.py: the `generate`, `chat` and `serve` command-line stages.

Names are imported on first use, so the command line can register its sub-commands without
importing FastAPI.
"""

from __future__ import annotations

__all__ = ["EngineRunner", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app
        return create_app
    if name == "EngineRunner":
        from .runner import EngineRunner
        return EngineRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
