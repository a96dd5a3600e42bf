"""After pretraining: export the backbone, fine-tune it on a downstream task, compare two backbones.

- :mod:`.export`: a training checkpoint -> a stock torchvision/timm backbone file (+ JSON sidecar).
- :mod:`.finetune`: one fine-tuning run (train/val/test split, a linear head, model selection, report).
- :mod:`.tasks`: what a run learns (``TASKS``: regress a lens parameter, classify lens / non-lens).
- :mod:`.seeds`: one recipe over several seeds, and the paired seed-aware comparison of two reports.

Images are read by the one shard reader (:mod:`hpc_lensiam.shards.reader`), weights by
:mod:`hpc_lensiam.models.weights`; statistics and the classify task's metrics (ROC AUC, TPR at fixed
FPR, the ROC curve) live in :mod:`hpc_lensiam.evaluation`; nothing here imports another stage.
"""
