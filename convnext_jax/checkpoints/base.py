"""What every checkpoint module shares: the item and directory names both kinds of checkpoint
use on disk, and `CheckpointError`."""

METADATA_ITEM = 'metadata'
STATE_ITEM = 'state'
CHECKPOINT_DIR = 'checkpoints'


class CheckpointError(ValueError):
  """A checkpoint path that cannot be read as asked; the message is one readable line."""
