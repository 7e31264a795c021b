"""Stages of ``benchmarks/gpu_check.py``: each runs in its own process under a time budget and writes its results
incrementally (see ``_common.StageResult``), so a stage that hangs or is killed keeps what it measured."""
