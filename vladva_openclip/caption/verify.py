"""``vladva caption --verify OUT``: does the job folder hold every input key exactly once?

Re-reads the input's keys (no image is decoded) and compares them, partition by partition, with the sidecars:
missing partitions, stale ones (another job's, or input files changed since), keys captioned twice (within or across sidecars), input keys that are neither captioned nor
listed as skipped, sidecar keys that are not in the input, and (with ``--write-wds``) rewritten tars whose keys
differ from the sidecar's.
"""
from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

from .inputs import open_caption_source, partition_keys
from .output import JOB_FILE, JobFolder, read_sidecar

__all__ = ["verify_output"]

EXAMPLES = 10


def verify_output(out: str | Path) -> dict[str, Any]:
    """A report: ``ok`` plus the problems found (each list holds at most a few examples; counts are complete)."""
    root = Path(out)
    job_file = root / JOB_FILE
    if not job_file.is_file():
        raise FileNotFoundError(f"{root} is not a vladva caption folder (no {JOB_FILE})")
    job = json.loads(job_file.read_text())
    spec = job["input"]["spec"]
    source = open_caption_source(spec["input"], spec["input_format"], img_key=spec["img_key"],
                                 caption_key=spec["caption_key"], key_column=spec["key_column"],
                                 separator=spec["csv_separator"], wds_caption_key=spec["wds_caption_key"])
    names = job["partitions"]
    folder = JobFolder(root, names)
    report: dict[str, Any] = {"partitions": len(names), "finished": 0, "missing_partitions": [],
                              "stale_partitions": [], "captioned": 0, "skipped": 0, "duplicate_keys": 0,
                              "missing_keys": 0, "unknown_keys": 0, "wds_mismatches": [], "examples": {}}
    seen: Counter[str] = Counter()
    examples = report["examples"]
    for k, name in enumerate(names):
        path = folder.sidecar(k)
        if not path.is_file():
            report["missing_partitions"].append(name)
            continue
        df, meta = read_sidecar(path)
        if meta.get("digest") != job["digest"] or meta.get("inputs") != source.partition_fingerprint(
                k, job["shard_size"]):
            report["stale_partitions"].append(name)
            continue
        report["finished"] += 1
        keys = df["key"].tolist()
        skipped = [s["key"] for s in meta.get("skipped", [])]
        report["captioned"] += len(keys)
        report["skipped"] += len(skipped)
        seen.update(keys)
        expected = partition_keys(source, k, job["shard_size"])
        expected_set, covered = set(expected), set(keys) | set(skipped)
        missing = [key for key in expected if key not in covered]
        unknown = [key for key in keys if key not in expected_set]
        report["missing_keys"] += len(missing)
        report["unknown_keys"] += len(unknown)
        examples.setdefault("missing_keys", []).extend(missing[:EXAMPLES])
        examples.setdefault("unknown_keys", []).extend(unknown[:EXAMPLES])
        if job["outputs"].get("wds"):
            tar = folder.tar(k)
            if not tar.is_file():
                report["wds_mismatches"].append(f"{name}: no rewritten tar")
            else:
                with_long = _keys_with(tar, "long.txt")
                want = set(df.loc[df["long_caption"].notna(), "key"])
                if with_long != want:
                    report["wds_mismatches"].append(f"{name}: {len(with_long ^ want)} keys differ in long.txt")
    dupes = [key for key, n in seen.items() if n > 1]
    report["duplicate_keys"] = len(dupes)
    examples["duplicate_keys"] = dupes[:EXAMPLES]
    report["examples"] = {k: v[:EXAMPLES] for k, v in examples.items() if v}
    report["ok"] = not (report["missing_partitions"] or report["stale_partitions"] or report["duplicate_keys"]
                        or report["missing_keys"] or report["unknown_keys"] or report["wds_mismatches"])
    return report


def _keys_with(tar_path: Path, suffix: str) -> set[str]:
    with tarfile.open(tar_path) as tar:
        return {m.name[:-len(suffix) - 1] for m in tar if m.isfile() and m.name.endswith("." + suffix)}



