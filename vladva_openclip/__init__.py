"""vladva_openclip: VladVA embedding models behind open_clip's API (placeholder, being built)."""
__version__ = "0.1.0"
