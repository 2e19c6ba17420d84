"""Runners (ONNX Runtime, TensorRT, trtexec, PyTorch), one timing protocol, power/energy, comparison."""
from .api import BenchResult, benchmark, benchmark_pair
from .compare import CompareResult, compare_outputs
from .timing import Timing, interleaved, time_fn

__all__ = ["BenchResult", "benchmark", "benchmark_pair", "CompareResult", "compare_outputs", "Timing", "time_fn", "interleaved"]
