"""Launched by tests/test_train_scale.py with ``torchrun --nproc_per_node 2``: runs ``vladva-train`` (in process)
once per mode named on the command line, each in ``<logs>/<mode>``, so the test can compare the final weights and
the logged losses with a 1-process run of the same global batch.

Usage: dist_train_check.py LOGS MODE[,MODE...] -- COMMON TRAINER FLAGS. A mode is ``name:flag flag ...``.
"""
import os
import sys

import torch.distributed as dist


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logs, modes = sys.argv[1], sys.argv[2].split(",")
    common = sys.argv[sys.argv.index("--") + 1:]
    from vladva_openclip.train.main import main as train

    # open_clip_train initialises the process group in every run; the runs of this process share one group
    # (a destroyed gloo group cannot be re-created on torchrun's store).
    init = dist.init_process_group
    dist.init_process_group = lambda *a, **kw: None if dist.is_initialized() else init(*a, **kw)
    for mode in modes:
        name, _, flags = mode.partition(":")
        rc = train(common + ["--logs", logs, "--name", name] + flags.split())
        if rc not in (None, 0):
            return int(rc)
        dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
