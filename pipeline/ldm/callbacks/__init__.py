"""Training callbacks used by ``main.py``: run directory set-up, previews, resources, emergency checkpoints."""
from ldm.callbacks.checkpointing import CheckpointOnException, CheckpointOnSignal, save_checkpoint_now
from ldm.callbacks.image_logger import ImageLogger
from ldm.callbacks.resources import ResourceMonitor
from ldm.callbacks.setup import SetupCallback

__all__ = ["CheckpointOnException", "CheckpointOnSignal", "ImageLogger", "ResourceMonitor", "SetupCallback",
           "save_checkpoint_now"]
