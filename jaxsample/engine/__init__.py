"""The slot engine: continuous batching inside the compiled decode loop (docs/engine.md)."""

from jaxsample.engine.scheduler import EngineStats as EngineStats
from jaxsample.engine.scheduler import PassThrough as PassThrough
from jaxsample.engine.scheduler import SlotEngine as SlotEngine
from jaxsample.engine.scheduler import SlotRequest as SlotRequest
from jaxsample.engine.scheduler import SlotResult as SlotResult
from jaxsample.engine.scheduler import compile_count as compile_count
from jaxsample.engine.slots import EMPTY as EMPTY

__all__ = [
    "EMPTY",
    "EngineStats",
    "PassThrough",
    "SlotEngine",
    "SlotRequest",
    "SlotResult",
    "compile_count",
]
