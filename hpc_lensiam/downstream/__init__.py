"""After pretraining: export the backbone, fine-tune it on a downstream task, compare two backbones.

- :mod:`.export`: a training checkpoint -> a stock torchvision/timm backbone file (+ JSON sidecar).
- :mod:`.finetune`: one fine-tuning run (train/val/test split, a linear head, model selection, report).
- :mod:`.tasks`: what a run learns (``TASKS``: regress a lens parameter, classify lens / non-lens).
- :mod:`.classify_metrics`: ROC AUC, TPR at fixed FPR and the ROC curve of the classify task.
- :mod:`.seeds`: one recipe over several seeds, and the paired seed-aware comparison of two reports.

Images are read by the data layer (:mod:`hpc_lensiam.data.images`), statistics live in
:mod:`hpc_lensiam.stats`; nothing here imports from ``embed/``.
"""
