"""calciscope: CNN scoring of biopsy whole-slide images for the calciphylaxis pattern.

Decision support for pathologists, never a diagnosis.
"""

__version__ = "0.1.0"
