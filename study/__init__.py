"""The quality study: dense vs static vs SET vs RigL on scikit-learn's digits. Run `python -m study`."""
