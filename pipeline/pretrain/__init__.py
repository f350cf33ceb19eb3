"""pretrain: a deterministic, resumable trainer over the published data order.

`run(recipe, out_dir)` trains in-process for world_size 1, or launches torchrun workers
(`pipeline.pretrain.worker`) for world_size > 1 (engine torchrun or deepspeed). Writes under
out_dir: checkpoints/step-XXXXXXX/, final/ (a Hugging Face model dir), metrics.json,
history.json, dvclive/, loss_curve.png, provenance.json.
"""

from pipeline.pretrain.launch import run  # noqa: F401
