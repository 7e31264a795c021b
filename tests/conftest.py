"""Shared fixtures. TRITON_INTERPRET must be set before anything imports triton, so it is set here first."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
