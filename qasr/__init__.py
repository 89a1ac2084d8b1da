"""qwen3-asr-edge: Qwen3-ASR and Qwen3-ForcedAligner on ONNX Runtime and TensorRT, without PyTorch."""

__version__ = "0.1.0"
