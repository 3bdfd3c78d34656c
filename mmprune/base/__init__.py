"""Base layer: the project's error type, atomic outputs, signal handling, the entry-point wrapper, the
method names (`presets`), the model-adapter registry and the sparse checkpoint format (compressed-tensors;
byte counts of weight files). Imports nothing from mmprune outside mmprune.base."""
