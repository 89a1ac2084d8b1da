"""The exceptions users see.

Every failure that bad input can cause is raised as a `QasrError` whose message is one line naming
the file (or other source) and the problem. The CLI prints that line and exits non-zero; anything
else that escapes is a bug, and the CLI shows the traceback for it.
"""


class QasrError(Exception):
    """Base class: one line, naming the source and the problem."""


class AudioError(QasrError):
    """Audio that cannot be read or used: unreadable, empty, not finite, absurd sample rate."""


class CheckpointError(QasrError):
    """A Hugging Face checkpoint directory that is missing files, corrupt, or of an unknown kind."""


class BundleError(QasrError):
    """An exported bundle (graphs, tokenizer, manifest.json) that is missing, corrupt or mismatched."""


class EngineError(QasrError):
    """A TensorRT engine that cannot be built or loaded here (no TensorRT, no GPU, built elsewhere)."""


class UsageError(QasrError):
    """A request the model cannot serve: unsupported language, empty text to align, bad option."""


def first_line(exc: BaseException) -> str:
    """The first non-blank line of a third-party exception, for quoting inside one of ours (their
    messages run to tracebacks and hints of their own)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
