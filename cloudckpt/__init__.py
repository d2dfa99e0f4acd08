"""cloudckpt: asynchronous checkpoints straight to GCS, S3 and the file system."""

from __future__ import annotations

from cloudckpt import args, backends
from cloudckpt._args_base import CheckpointArgs
from cloudckpt.backends import Backend, RetryPolicy
from cloudckpt.checkpointer import AsyncCheckpointer, Checkpointer, SaveTiming
from cloudckpt.composite import CompositeCheckpointHandler
from cloudckpt.errors import CorruptCheckpointError
from cloudckpt.handlers.base import AsyncCheckpointHandler, CheckpointHandler
from cloudckpt.handlers.json import JsonCheckpointHandler
from cloudckpt.handlers.pytree import ArrayMetadata, StandardCheckpointHandler
from cloudckpt.manager import CheckpointManager, CheckpointManagerOptions
from cloudckpt.metadata import StepMetadata
from cloudckpt.multihost import MultiprocessingOptions, ProcessFailedError
from cloudckpt.path import StoragePath
from cloudckpt.registry import HandlerRegistry, register_with_handler

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
