"""Training callbacks used by ``main.py``: run directory set-up, previews, resources, ``last.ckpt``."""
from ldm.callbacks.checkpointing import LastCheckpoint, save_checkpoint_now
from ldm.callbacks.image_logger import ImageLogger
from ldm.callbacks.resources import ResourceMonitor
from ldm.callbacks.setup import SetupCallback

__all__ = ["ImageLogger", "LastCheckpoint", "ResourceMonitor", "SetupCallback", "save_checkpoint_now"]
