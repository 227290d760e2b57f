"""The errors a user can cause, as opposed to bugs: the command line prints their message as one
line and exits with status 2, never a traceback."""


class UserError(ValueError):
    """Bad input or settings; the message says what and where, in one line."""


class StructureError(UserError):
    """A structure that cannot be turned into a graph; the message names the entry and the problem."""


class ConfigError(UserError):
    """A configuration that cannot run (unknown key, bad value, incompatible resume)."""


class DataError(UserError):
    """A dataset that cannot be used as asked (no such target, a missing column, an empty split...)."""


class CheckpointError(UserError):
    """A checkpoint file that cannot be used (damaged, truncated, not a checkpoint, refused by safe loading)."""


class DeviceError(UserError, RuntimeError):
    """A device or sparse backend this installation cannot use (no GPU, no CUDA build of DGL...)."""


class TrainingDiverged(UserError, FloatingPointError):
    """The loss or the gradient became NaN or infinite (a learning rate too high, bad targets)."""


__all__ = ["CheckpointError", "ConfigError", "DataError", "DeviceError", "StructureError", "TrainingDiverged", "UserError"]
