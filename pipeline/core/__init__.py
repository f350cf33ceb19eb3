"""Shared mechanisms every stage uses, each in one place: recipe config, errors, atomic io, output locks,
integrity (verified reads, sealed outputs, confined paths), provenance, checkpoints, ladder rungs, the
published data order, the model, byte-counting collectives, numerics, devices, data executors."""
