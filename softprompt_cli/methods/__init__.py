"""The soft-prompt methods: `base` (options, registry, ModelSpec) and one module per method."""
