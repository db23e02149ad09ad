"""Training: one engine (``engine``) under three trainers (``train``: tile CNN / attention-MIL; ``train_segmenter``:
the vessel U-Net; ``train_classifier``: the vessel and calcium-artifact classifiers), with their configs, data,
splits, metrics and calibration."""
