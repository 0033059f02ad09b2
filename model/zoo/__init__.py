"""Models by name: the registry, presets, checkpoints, the hub, the SmolLM2 demo, the catalog."""
