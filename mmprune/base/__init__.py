"""Base layer: the project's error type, atomic outputs, signal handling, the entry-point wrapper and the
model-adapter registry. Imports nothing from mmprune outside mmprune.base."""
