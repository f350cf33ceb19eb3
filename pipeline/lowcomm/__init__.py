"""Low-communication pretraining: DiLoCo (+ compressed, streaming outer sync) and DeMo strategies.

The trainer (pipeline/pretrain) picks one by `pretrain.distributed.mode`; all their traffic goes
through pipeline.core.comm.Comm, which counts the bytes each worker sends.
"""
