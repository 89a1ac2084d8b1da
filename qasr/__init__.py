"""qwen3-asr-edge: Qwen3-ASR and Qwen3-ForcedAligner on ONNX Runtime and TensorRT, without PyTorch."""

from qasr.runtime.align import Aligner
from qasr.runtime.backends.onnxruntime_cpu import share_threads
from qasr.runtime.options import TranscribeOptions
from qasr.runtime.transcribe import Transcriber
from qasr.version import __version__

__all__ = ["Aligner", "TranscribeOptions", "Transcriber", "__version__", "share_threads"]
