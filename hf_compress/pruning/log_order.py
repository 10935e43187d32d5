"""Values that a callback adds to the Trainer's logs must reach the ``report_to`` integrations too.

transformers registers the integrations (TensorBoard, W&B, MLflow, ...) before user callbacks, so a user callback's
``on_log`` runs after they have written the step. :func:`log_before_integrations` places a small :class:`LogFirst`
callback right after ``DefaultFlowCallback`` in the handler that is calling the current event: it adds the
callback's values (its ``add_log_values(state, logs)``) before any integration sees ``logs``. Callbacks get no handle
on that handler, so it is found on the call stack; ``tests/pruning/test_logging.py`` checks it with TensorBoard.
"""

from __future__ import annotations

import inspect

from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback


class LogFirst(TrainerCallback):
    """Adds a callback's values to ``logs`` before the ``report_to`` integrations (placed just after
    ``DefaultFlowCallback``), so TensorBoard / W&B / MLflow record them too."""

    def __init__(self, callback: TrainerCallback):
        self.callback = callback

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.callback.add_log_values(state, logs)


def calling_handler() -> CallbackHandler | None:
    """The ``CallbackHandler`` whose ``call_event`` is running the current callback event, if any."""
    frame = inspect.currentframe()
    try:
        for _ in range(
            6
        ):  # calling_handler <- log_before_integrations <- on_<event> <- call_event (self: the handler)
            frame = frame.f_back if frame is not None else None
            handler = frame.f_locals.get("self") if frame is not None else None
            if isinstance(handler, CallbackHandler):
                return handler
        return None
    finally:
        del frame


def log_before_integrations(callback: TrainerCallback) -> None:
    """Register a :class:`LogFirst` for ``callback`` right after ``DefaultFlowCallback`` in the calling handler."""
    handler = calling_handler()
    if handler is None or any(isinstance(cb, LogFirst) and cb.callback is callback for cb in handler.callbacks):
        return
    index = next((i + 1 for i, cb in enumerate(handler.callbacks) if isinstance(cb, DefaultFlowCallback)), 0)
    handler.callbacks.insert(index, LogFirst(callback))
