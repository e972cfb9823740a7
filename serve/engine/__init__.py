"""The inference engine: one model's weights, paged KV pool and step thread; never imports Ray.

    from slotserve.engine import Engine, SamplingParams
    eng = Engine.from_pretrained(path, device="cuda", dtype="bfloat16")
    eng.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=16))
"""

from slotserve.engine.engine import Engine, EngineMemory
from slotserve.engine.request import (AdmissionError, EngineClosedError, EngineParkedError, RequestHandle,
                                      SamplingParams)

__all__ = ["Engine", "EngineMemory", "SamplingParams", "RequestHandle", "AdmissionError", "EngineClosedError",
           "EngineParkedError"]
