"""s2d: sparse-to-dense post-training from the shell (arXiv 2605.12483)."""
__version__ = "0.1.0"
