"""Slide scoring, saliency, reports and batch running."""
