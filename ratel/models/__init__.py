"""Reference models built into Ratel."""
from ratel.models.gpt import GPT, GPTConfig, GPTOutput

__all__ = ["GPT", "GPTConfig", "GPTOutput"]
