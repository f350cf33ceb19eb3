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
