"""MedSAM3: adapt SAM3 to medical imaging at cluster scale (prepare → train → evaluate → serve)."""

__version__ = "0.1.0"
