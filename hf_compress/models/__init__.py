"""What hf_compress knows about architectures: the family table, the helpers that read it, the task-head table."""

from hf_compress.models.describe import describe

__all__ = ["describe"]
