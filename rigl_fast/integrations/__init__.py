"""Framework integrations on top of RigLScheduler (in_step=True): each module imports its framework itself.

- `rigl_fast.integrations.hf.RigLCallback`: a `transformers.TrainerCallback` for the HF Trainer.
- `rigl_fast.integrations.lightning.RigLCallback`: a `lightning.pytorch.Callback`.

This package imports nothing: `import rigl_fast` (or this package) never imports transformers or any other
framework; only importing an integration's own module does, and it says which package to install when the
framework is missing.
"""
