"""Where a source checkout keeps the folders that run as `rigl_fast.*` packages (kernels/, bench/, study/).

None of those top-level folders is a regular package (no __init__.py): Python started in the checkout's root
puts the root first on sys.path, and a folder there named `kernels` (or `bench`, `study`, ...) with an
__init__.py would shadow the installed distribution of that name for every import, as it did to HF's `kernels`,
which transformers imports. They are reached only through `rigl_fast`, whose packages add the folder to their
`__path__` here. An install copies the Triton sources into rigl_fast/kernels (setup.py), so it needs no folder.
"""
import os
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def folder(name: str) -> List[str]:
    """[the checkout's top-level folder `name`] in a source checkout (setup.py beside the package), else []."""
    path = os.path.join(ROOT, name)
    return [path] if os.path.isfile(os.path.join(ROOT, "setup.py")) and os.path.isdir(path) else []
