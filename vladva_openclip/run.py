"""Run a stock tool of the CLIP ecosystem, unchanged, in a process where the VladVA models are registered.

open_clip finds models by name in its own registry, and a plain ``python -m open_clip_train.main`` or
``clip_benchmark`` process never imports this plugin, so ``--model vladva-...`` stops with "Model config ... not
found". This launcher imports the plugin first, then hands over to the tool as if it had been started directly::

    vladva-run clip_benchmark eval --model vladva-tiny-llava --pretrained synth_captioner --dataset ...
    python -m vladva_openclip.run open_clip_train.main --model vladva-tiny-llava --train-data ...
    torchrun --nproc_per_node 8 -m vladva_openclip.run open_clip_train.main --model vladva-llava7b ...

TOOL is a console script (``clip_benchmark``, ``clip-retrieval``...) or a module run as ``python -m`` would run it.
Nothing else changes: the tool parses its own arguments, and its exit status is this process's. (``vladva-train``
and ``vladva-clip-benchmark`` are the extended versions: open_clip_train with the VladVA loss and data, and
CLIP_benchmark with the loader that reads the base straight into its dtype.)
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import runpy
import sys
from collections.abc import Sequence

USAGE = "usage: vladva-run TOOL [ARGS...]   (TOOL: a console script such as clip_benchmark, or a module such as " \
        "open_clip_train.main)"


def _console_script(name: str) -> importlib.metadata.EntryPoint | None:
    for entry in importlib.metadata.entry_points(group="console_scripts"):
        if entry.name == name:
            return entry
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(f"{__doc__}\n{USAGE}")
        return 0
    tool, args = argv[0], argv[1:]
    script = _console_script(tool)  # resolved before the (slow) plugin import, so a typo fails at once
    if script is None:
        try:
            found = importlib.util.find_spec(tool) is not None
        except ModuleNotFoundError as err:  # a parent package is missing
            found, why = False, str(err)
        else:
            why = f"No module named {tool!r}"
        if not found:
            print(f"vladva-run: no console script or module named {tool!r} ({why}); install the tool, or name its "
                  f"module (e.g. open_clip_train.main)", file=sys.stderr)
            return 2
    import vladva_openclip

    vladva_openclip.install()
    sys.argv = [tool, *args]
    if script is not None:
        result = script.load()()
        return result if isinstance(result, int) else 0
    runpy.run_module(tool, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
