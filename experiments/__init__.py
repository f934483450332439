"""Experiments: one module per study, each a frozen config with quick/full presets and a run function."""
