"""Training loop, splits, metrics and calibration."""
