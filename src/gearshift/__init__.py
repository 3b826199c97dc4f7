"""gearshift: an LLM inference engine that decides, token by token, how much model to spend."""

from .config import EngineConfig
from .core import EngineCore
from .errors import GearshiftError
from .llm import LLM, Stream, load
from .sampling import SamplingParams
from .sequence import Completion, Logprob, Request, StepOutput

__all__ = [
    "LLM",
    "Completion",
    "EngineConfig",
    "EngineCore",
    "GearshiftError",
    "Logprob",
    "Request",
    "SamplingParams",
    "StepOutput",
    "Stream",
    "load",
]
__version__ = "0.1.0"
