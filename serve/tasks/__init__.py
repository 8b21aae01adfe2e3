"""Tasks: what goes into a model and what comes out. TASKS is the one list a new task is added to."""
from __future__ import annotations

from serve.tasks.base import Task
from serve.tasks.classify import Classify
from serve.tasks.detect import Detect
from serve.tasks.embed import Embed
from serve.tasks.segment import Segment

TASKS: dict[str, type[Task]] = {task.name: task for task in (Classify, Detect, Segment, Embed)}
