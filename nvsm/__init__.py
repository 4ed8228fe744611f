"""nvsm: few-shot category-level 3D pose with Neural View Synthesis and Matching."""

__version__ = "0.1.0"
