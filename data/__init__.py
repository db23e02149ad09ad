"""Slides, tissue, tiling, annotations, datasets and the phantom generator."""
