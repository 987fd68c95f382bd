"""Ratel: fine-tune language models many times larger than GPU memory.

    engine = ratel.compile(model, budget="24GiB", optimizer=ratel.AdamW(lr=1e-5), example_inputs=(ids,))
    loss = engine(ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
"""
from ratel.api import Budget, Engine, compile, parse_bytes
from ratel.errors import BudgetError, PassError, PlanViolation, RatelError, TraceError
from ratel.ir.hardware import HardwareProfile
from ratel.runtime.calibrate import detect as detect_hardware
from ratel.runtime.optimizer import AdamW
from ratel.tools.explain import explain
from ratel.tools.summary import plan_summary as summary
from ratel.tools.log import configure as _configure_logging

__all__ = ["AdamW", "Budget", "BudgetError", "Engine", "HardwareProfile", "PassError", "PlanViolation",
           "RatelError", "TraceError", "compile", "detect_hardware", "explain", "parse_bytes", "summary"]
__version__ = "0.1.0"
_configure_logging()   # RATEL_LOG=debug|info|warning
