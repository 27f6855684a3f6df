"""Errors a user can fix, shared by the modules that raise them and the CLI that turns every error
into a message and an exit code (error_policy.error_message)."""


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as asked: another recipe's, not ours, a file, or in use."""


class CardError(ValueError):
    """A run folder the card cannot be written for; the message names the file and the problem."""


# Exit codes of `mmpr publish`.
OK, REFUSED, AUTH, NETWORK = 0, 2, 3, 4


class PublishError(Exception):
    """Publishing stopped; `code` is the exit code, the message says what to do."""

    def __init__(self, message: str, code: int = REFUSED):
        super().__init__(message)
        self.code = code


class ExportError(ValueError):
    """A run folder that cannot be exported, or an output folder that must not be touched."""


class PreviewError(ValueError):
    """A run folder the preview cannot be written for; the message names the file and the problem."""


class TrainInputError(ValueError):
    """A training config, or the pairs it names, that cannot be used; the message says which and why."""


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight: it stops before saving anything from
    that step (a model of NaNs must never look like a finished run). Exit code 1, its message alone."""

    code = 1
