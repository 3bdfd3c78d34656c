"""Placement: where a run's weights live (accelerate device maps, CPU/disk offload, the memory plan).
May import mmprune.base only; models are built through the adapter registry, never by name."""
