"""cloudckpt: asynchronous checkpoints straight to GCS, S3 and the file system."""

from __future__ import annotations

from cloudckpt import args
from cloudckpt import storage as backends
from cloudckpt.engine.checkpointer import AsyncCheckpointer, Checkpointer, SaveTiming
from cloudckpt.engine.manager import CheckpointManager
from cloudckpt.engine.multihost import MultiprocessingOptions, ProcessFailedError
from cloudckpt.engine.policy import CheckpointManagerOptions
from cloudckpt.errors import CorruptCheckpointError
from cloudckpt.format.step import StepMetadata
from cloudckpt.handlers.args import CheckpointArgs
from cloudckpt.handlers.base import AsyncCheckpointHandler, CheckpointHandler
from cloudckpt.handlers.composite import CompositeCheckpointHandler
from cloudckpt.handlers.json import JsonCheckpointHandler
from cloudckpt.handlers.pytree import ArrayMetadata, StandardCheckpointHandler
from cloudckpt.handlers.registry import HandlerRegistry, register_with_handler
from cloudckpt.storage import Backend, RetryPolicy
from cloudckpt.storage.path import StoragePath

__all__ = [
    "ArrayMetadata",
    "AsyncCheckpointHandler",
    "AsyncCheckpointer",
    "Backend",
    "CheckpointArgs",
    "CheckpointHandler",
    "CheckpointManager",
    "CheckpointManagerOptions",
    "Checkpointer",
    "CompositeCheckpointHandler",
    "CorruptCheckpointError",
    "HandlerRegistry",
    "JsonCheckpointHandler",
    "MultiprocessingOptions",
    "ProcessFailedError",
    "RetryPolicy",
    "SaveTiming",
    "StandardCheckpointHandler",
    "StepMetadata",
    "StoragePath",
    "args",
    "backends",
    "register_with_handler",
]
