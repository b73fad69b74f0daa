"""Stand-in for torchvision where the real one does not import (PyPI's is a CUDA build; this machine's torch
is CPU-only). rigl-torch 0.5.2 imports torchvision only to test isinstance against two ResNet block classes
while it walks a model; empty classes satisfy that. Put tests/_stubs on sys.path only when
`import torchvision` fails."""
from . import models  # noqa: F401
