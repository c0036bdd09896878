"""unshortcut: find and remove shortcut learning in patch-wise tumor classification."""

__version__ = "0.1.0"
