"""Import rigl-torch 0.5.2's RigLScheduler, with the torchvision stub when the real torchvision is missing."""
import os
import sys


def import_rigl_torch():
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        stub = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_stubs")
        if stub not in sys.path:
            sys.path.insert(0, stub)
    from rigl_torch.RigL import RigLScheduler
    return RigLScheduler
