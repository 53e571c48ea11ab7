"""Placeholder demo until the Saver lands."""

import lightning_saver

print(f"lightning_saver {lightning_saver.__version__} imported")
