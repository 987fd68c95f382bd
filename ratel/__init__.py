"""Ratel: fine-tune language models many times larger than GPU memory.

    engine = ratel.compile(model, budget="24GiB", optimizer=ratel.AdamW(lr=1e-5), example_inputs=(ids,))
    loss = engine(ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
"""
from ratel.api import Budget, Engine, compile, parse_bytes
from ratel.errors import BudgetError, PassError, PlanViolation, RatelError, TraceError
from ratel.hardware import HardwareProfile
from ratel.runtime.optimizer import AdamW
from ratel.tools.explain import explain
from ratel.tools.log import configure as _configure_logging

__all__ = ["AdamW", "Budget", "BudgetError", "Engine", "HardwareProfile", "PassError", "PlanViolation",
           "RatelError", "TraceError", "compile", "explain", "parse_bytes"]
__version__ = "0.1.0"
_configure_logging()   # RATEL_LOG=debug|info|warning
