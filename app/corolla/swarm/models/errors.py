"""Errors the model engine raises on bad input, each with a message a person can act on."""


class EngineError(Exception):
    """Base class: bad input to the model engine (never a bug inside it)."""


class UnsupportedArchitectureError(EngineError):
    """The model's architecture has no adapter."""


class CheckpointError(EngineError):
    """A checkpoint file is missing, unreadable, corrupt or inconsistent with its index."""


class BlockRangeError(EngineError):
    """A requested block range lies outside the model."""


class DeviceError(EngineError):
    """The device does not exist here, or cannot run the requested dtype or quantization."""


class CacheRollbackError(EngineError):
    """A session cache cannot be rolled back to the requested position."""


class CacheCapacityError(EngineError):
    """A step does not fit the session's preallocated cache: more tokens than its max_length, or
    another batch size than the one the cache was allocated for."""
