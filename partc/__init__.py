"""partc: a compiler for distributed DNN inference across device, edge and cloud.

The Python API mirrors the command line: ``partc.inspect`` is ``partc inspect``.
"""

from partc.report import inspect, trace_model
from partc.trace import load_model

__all__ = ["inspect", "load_model", "trace_model"]
__version__ = "0.1.0"
