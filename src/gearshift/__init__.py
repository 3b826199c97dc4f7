"""gearshift: an LLM inference engine that decides, token by token, how much model to spend."""

from .engine import LLM, Completion, load
from .errors import GearshiftError
from .sampling import SamplingParams

__all__ = ["LLM", "Completion", "GearshiftError", "SamplingParams", "load"]
__version__ = "0.1.0"
