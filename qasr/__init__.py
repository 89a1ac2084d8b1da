"""qwen3-asr-edge: Qwen3-ASR and Qwen3-ForcedAligner on ONNX Runtime and TensorRT, without PyTorch."""

__version__ = "0.1.0"
__all__ = ["Aligner", "Transcriber", "__version__"]


def __getattr__(name: str):
    """Transcriber and Aligner load on first use, so `import qasr` (and the CLI) start fast."""
    if name == "Transcriber":
        from qasr.runtime.transcribe import Transcriber

        return Transcriber
    if name == "Aligner":
        from qasr.runtime.align import Aligner

        return Aligner
    raise AttributeError(f"module 'qasr' has no attribute {name!r}")
