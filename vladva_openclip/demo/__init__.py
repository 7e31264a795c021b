"""The embedded default: VladVA's whole story on CPU in minutes, on the synthetic world.

- :mod:`.pretrain_captioner`: the tiny LLaVA's generative pretraining (the shipped ``synth_captioner`` tag);
- :mod:`.pipeline`: ``vladva demo``: zero-shot -> VladVA fine-tuning -> evaluation, beside a CLIP baseline;
- :mod:`.baseline`: the CLIP of similar size trained from scratch with open_clip_train;
- :mod:`.ablation`: the paper's Table 4 in miniature over several seeds;
- :mod:`.variants`, :mod:`.summary`: the configurations by name and the one-glance table.
"""
from .pipeline import PRESETS, DemoConfig, DemoResult, preset, run_demo
from .summary import SUMMARY_COLUMNS, SummaryTable
from .variants import VARIANTS, Variant, get_variant

__all__ = ["PRESETS", "SUMMARY_COLUMNS", "VARIANTS", "DemoConfig", "DemoResult", "SummaryTable", "Variant",
           "get_variant", "preset", "run_demo"]
