"""The embedded default task: a byte-level tokenizer, a tiny Qwen2 model warm-started
on integer arithmetic, and train/val sets in the DAPO-Math / verl parquet schema.

It needs no download; ``prepare_default_task`` builds it once into a cache
directory and later calls return the cached paths at once.
"""

from dapo.data.task.prepare import (
    DEFAULT_CACHE_DIR,
    DefaultTask,
    load_default_task,
    prepare_default_task,
)
from dapo.data.task.spec import TaskSpec

DEFAULT_TASK_NAME = "default-task"

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DEFAULT_TASK_NAME",
    "DefaultTask",
    "TaskSpec",
    "load_default_task",
    "prepare_default_task",
]
