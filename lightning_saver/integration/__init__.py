"""The only code that imports Lightning: the Saver callback, the CheckpointIO plugin, the CLI."""
