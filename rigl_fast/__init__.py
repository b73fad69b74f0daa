"""rigl_fast: fast, correct RigL dynamic sparse training for PyTorch (drop-in for rigl-torch 0.5.2)."""
from .scheduler import RigLScheduler

__version__ = "0.1.0"
__all__ = ["RigLScheduler", "__version__"]
