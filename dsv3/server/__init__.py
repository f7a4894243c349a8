"""The OpenAI-compatible server, in layers: `protocol` (wire schemas) -> `handlers` (requests to engine calls and
back) -> `engine_client` (asyncio client of the engine, which runs in its own process) -> the engine. `app` is the
FastAPI app (auth, limits, errors, /metrics); `cli` the `dsv3 serve` verb."""

from .app import ServerConfig, create_app
from .engine_client import EngineClient, EngineError
from .protocol import APIError, Prices

__all__ = ["create_app", "ServerConfig", "EngineClient", "EngineError", "APIError", "Prices"]
