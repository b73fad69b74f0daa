"""Import rigl-torch 0.5.2's RigLScheduler, with the torchvision stub when the real torchvision is missing."""
import os
import sys


def _drop_torchvision_modules():
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def import_rigl_torch():
    try:
        import torchvision  # noqa: F401
    except Exception:
        _drop_torchvision_modules()
        stub = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_stubs")
        sys.path.insert(0, stub)
        try:
            from rigl_torch.RigL import RigLScheduler
        finally:
            # rigl_torch keeps its own reference to the stub; nothing else may see it (code that asks
            # "does torchvision import?" must still hear no)
            sys.path.remove(stub)
            _drop_torchvision_modules()
        return RigLScheduler
    from rigl_torch.RigL import RigLScheduler
    return RigLScheduler
