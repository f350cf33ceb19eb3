"""The few exception types of the pipeline. Each message names the file, key or tensor at fault."""


class PipelineError(Exception):
    """Base class: the CLI prints the message on one line and exits with status 2."""


class RecipeError(PipelineError):
    """A recipe or data manifest is invalid (unknown key, wrong type, impossible value)."""

    def __init__(self, file, key: str, message: str):
        self.file, self.key = str(file), key
        super().__init__(f"{file}: {key}: {message}" if key else f"{file}: {message}")


class DataIntegrityError(PipelineError):
    """Data on disk does not match what was recorded (hash, size, locked source)."""


class CheckpointError(PipelineError):
    """A checkpoint is missing, truncated or does not match its manifest."""


class TrainingDiverged(PipelineError):
    """A non-finite loss or weight (pretrain, posttrain): nothing after the last good checkpoint was kept."""


class TrainingStopped(PipelineError):
    """Stopped by a signal after writing a checkpoint; resume with `--resume latest`."""


class reading:  # noqa: N801 - used as `with reading(path):`
    """Turn any error raised while reading `what` (a file, or `file: key`) into one DataIntegrityError
    naming it, e.g. a tokenizers, safetensors, JSON or Unicode error that names no file itself."""

    def __init__(self, what, action: str = "cannot read"):
        self.what, self.action = str(what), action

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is None or isinstance(exc, (PipelineError, KeyboardInterrupt, SystemExit, MemoryError)):
            return False
        raise DataIntegrityError(f"{self.what}: {self.action} ({one_line(exc)})") from exc


def one_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line, cut to `limit` characters."""
    msg = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"
