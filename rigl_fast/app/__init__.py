"""The `rigl-fast` demo app (command line, demo models and data, reports); the library never imports it."""
