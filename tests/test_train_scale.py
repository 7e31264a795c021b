"""Training at scale without silent mis-training: world-size-independent loss balance (1 x 8 against 2 x 4 under
torchrun + gloo), true logged losses under --accum-freq (TensorBoard and W&B alike), DDP with unused trainables,
the --local-loss refusal, precision defaults, the safe --resume path and multi-source webdataset sizes."""
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--model", "vladva-tiny-llava", "--dataset-type", "synthetic", "--synthetic-size", "32", "--workers", "0",
          "--precision", "fp32", "--lr", "1e-2", "--warmup", "0", "--seed", "0", "--max-short-len", "24",
          "--max-long-len", "64", "--log-every-n-steps", "1", "--report-to", "", "--epochs", "1"]


def _final_state(logs: Path, name: str) -> dict[str, torch.Tensor]:
    state = torch.load(logs / name / "checkpoints" / "epoch_1.pt", weights_only=True)["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}  # DDP's prefix


def _rel_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max() / (b[k].abs().max() + 1e-12)) for k in a)


def _logged(logs: Path, name: str) -> list[dict[str, float]]:
    """Per-step losses of out.log: the value before the running average in parentheses."""
    rows = []
    for line in (logs / name / "out.log").read_text().splitlines():
        if "Train Epoch" in line:
            rows.append({k.lower(): float(v) for k, v in re.findall(r"(\w+_loss|Loss): ([-0-9.e]+) \(", line)})
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_train_exactly_like_one_in_every_correct_mode(tmp_path):
    """Final weights after 4 AdamW steps and the logged losses: 2 processes x 4 equal 1 x 8 (fp32 rounding)."""
    from vladva_openclip.train.main import main

    for name, extra in (("single", []), ("single_pairs", ["--text-pairs"])):
        assert main(COMMON + ["--batch-size", "8", "--logs", str(tmp_path), "--name", name] + extra) in (None, 0)
    modes = {"plain": "", "gather": "--gather-with-grad", "gather_local": "--gather-with-grad --local-loss",
             "accum": "--batch-size 2 --accum-freq 2", "pairs": "--text-pairs"}
    # the script's folder heads sys.path under torchrun: name this checkout, or the installed package is imported
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(REPO / "tests" / "scripts" / "dist_train_check.py"), str(tmp_path),
           ",".join(f"{k}:{v}" for k, v in modes.items()), "--", *COMMON, "--batch-size", "4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    single, single_log = _final_state(tmp_path, "single"), _logged(tmp_path, "single")
    assert len(single_log) == 4
    for mode in ("plain", "gather", "gather_local", "accum"):
        err = _rel_diff(_final_state(tmp_path, mode), single)
        assert err < 5e-4, (mode, err)  # AdamW divides by sqrt(v): rounding shows up to ~1e-4 relative
        for got, ref in zip(_logged(tmp_path, mode), single_log, strict=True):
            for key in ("contrastive_loss", "ar_loss", "loss"):
                assert got[key] == pytest.approx(ref[key], rel=2e-4), (mode, key, got, ref)
    # --text-pairs leaves the image soft prompt unused: DDP must still train, and exactly
    pairs = _final_state(tmp_path, "pairs")
    assert _rel_diff(pairs, _final_state(tmp_path, "single_pairs")) < 5e-4


def _fake_loggers(monkeypatch):
    """TensorBoard and W&B stand-ins recording what open_clip_train hands them (neither is installed here)."""
    import open_clip_train.main as ocm
    import open_clip_train.train as oct

    seen = {"tb": [], "wandb": []}

    class Writer:
        def __init__(self, path):
            pass

        def add_scalar(self, name, value, step):
            seen["tb"].append((name, float(value), step))

        def close(self):
            pass

    wandb = types.SimpleNamespace(init=lambda **kw: None, watch=lambda *a, **kw: None, save=lambda *a, **kw: None,
                                  finish=lambda: None, run=None,
                                  log=lambda data, step=None: seen["wandb"].extend(
                                      (k, float(v), step) for k, v in data.items() if k != "step"))
    monkeypatch.setattr(ocm, "tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    monkeypatch.setattr(ocm, "wandb", wandb)
    monkeypatch.setattr(oct, "wandb", wandb)
    return seen


@pytest.mark.slow
def test_logged_losses_are_the_true_step_values_under_accumulation(tmp_path, monkeypatch):
    from vladva_openclip.train.main import main

    logged = {}
    for accum in (1, 4):
        seen = _fake_loggers(monkeypatch)
        name = f"accum{accum}"
        args = COMMON + ["--batch-size", str(8 // accum), "--accum-freq", str(accum), "--logs", str(tmp_path),
                         "--name", name]
        args[args.index("--report-to") + 1] = "tensorboard,wandb"
        assert main(args) in (None, 0)
        tb = {(n, s): v for n, v, s in seen["tb"] if n.endswith("loss")}
        wb = {(n, s): v for n, v, s in seen["wandb"] if n.endswith("loss")}
        assert tb and tb == wb  # both receive the same values
        assert {n for n, _ in tb} == {"train/contrastive_loss", "train/ar_loss", "train/loss"}
        logged[accum] = tb
    for accum in (4,):
        assert logged[accum].keys() == logged[1].keys()
        for key, ref in logged[1].items():
            # same global batch, same weights to fp32 rounding: the same losses (they were 1/N of them)
            assert logged[accum][key] == pytest.approx(ref, rel=2e-4), (accum, key)


def test_accumulated_logit_scale_gradient_equals_one_batch():
    """--accum-freq differentiates the whole loss with respect to logit_scale in every pass: the loss divides it
    back, so every trainable (logit_scale included) gets the one-batch gradient."""
    from vladva_openclip.loss import VladVALoss

    torch.manual_seed(0)
    img, txt = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1), torch.nn.functional.normalize(
        torch.randn(8, 16), dim=-1)
    nll, ntok = torch.rand(8) * 10, torch.randint(1, 9, (8,)).float()

    def grads(accum):
        scale = torch.tensor(2.0, requires_grad=True)
        i, t, n = img.clone().requires_grad_(), txt.clone().requires_grad_(), nll.clone().requires_grad_()
        loss_fn = VladVALoss(accum_freq=accum)
        per = 8 // accum
        values = None
        for j in range(accum):
            live = slice(j * per, (j + 1) * per)
            # open_clip's accumulation: other chunks' features cached (no grad), the AR sums of cached rows 0
            mask = torch.zeros(8, 1)
            mask[live] = 1
            fi = i * mask + (i * (1 - mask)).detach()
            ft = t * mask + (t * (1 - mask)).detach()
            nj = n * mask.squeeze(1)
            losses = loss_fn(fi, ft, scale, ar_nll_sum=nj, ar_num_tokens=ntok, output_dict=True)
            sum(losses.values()).backward()
            values = {k: float(v.detach()) for k, v in losses.items()}
        return scale.grad, i.grad, n.grad, values

    ref = grads(1)
    for accum in (2, 4):
        got = grads(accum)
        for a, b in zip(got[:3], ref[:3]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert got[3] == pytest.approx(ref[3], rel=1e-6)  # the last pass reports the whole step


def test_local_loss_without_gather_with_grad_is_refused(tmp_path, capsys):
    from vladva_openclip.loss import VladVALoss
    from vladva_openclip.train.main import main

    with pytest.raises(ValueError, match="--gather-with-grad"):
        VladVALoss(local_loss=True, world_size=2)
    rc = main(COMMON + ["--batch-size", "8", "--logs", str(tmp_path), "--name", "x", "--local-loss"])
    err = capsys.readouterr().err
    assert rc == 2 and "--local-loss without --gather-with-grad" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_resume_never_unpickles_code_even_when_torch_is_told_to(tmp_path, monkeypatch, capsys):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns torch.load's default to full unpickling; the trainer passes
    weights_only=True explicitly, which the variable cannot override."""
    from vladva_openclip.train.checkpoints import safe_pt_load
    from vladva_openclip.train.main import main

    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "evil.pt"
    torch.save({"epoch": 1, "state_dict": {}, "x": Payload()}, bad)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        safe_pt_load(str(bad))
    assert not marker.exists()
    rc = main(COMMON + ["--batch-size", "8", "--logs", str(tmp_path / "logs"), "--name", "r", "--resume", str(bad)])
    assert rc == 2 and not marker.exists()
    assert "cannot read checkpoint" in capsys.readouterr().err
    # the control: the same file with weights_only left to the environment does run the payload
    torch.load(bad)
    assert marker.exists()


def test_precision_default_and_fp32_base_warning(monkeypatch, caplog):
    import logging

    from vladva_openclip.factory import create_vladva
    from vladva_openclip.train import scale

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    with caplog.at_level(logging.INFO, logger="vladva_openclip"):
        assert scale.default_precision() == "amp_bf16"
    assert "bfloat16" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert scale.default_precision() == "amp"
    assert scale.flag_given(["--precision=fp32"], "--precision") and not scale.flag_given(["--lr", "1"], "--precision")
    big = create_vladva("vladva-llava7b", precision="amp", device="meta")
    small = create_vladva("vladva-llava7b", precision="amp_bf16", device="meta")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vladva_openclip"):
        scale.report_base_precision(big, "amp", precision_given=True)
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "26.3 GiB" in warning[0].getMessage() and "amp_bf16" in warning[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vladva_openclip"):
        scale.report_base_precision(small, "amp_bf16", precision_given=False)
    assert not caplog.records  # a bf16 base: nothing to say


def test_trainer_logs_the_plan_and_warns_when_it_exceeds_the_device(tmp_path, monkeypatch, caplog):
    import logging

    from vladva_openclip import plan as plan_mod
    from vladva_openclip.train.main import main

    monkeypatch.setattr(plan_mod, "device_memory", lambda device=None: 1 << 20)  # a 1 MiB "GPU"
    with caplog.at_level(logging.INFO):
        assert main(COMMON + ["--batch-size", "8", "--logs", str(tmp_path), "--name", "p",
                              "--synthetic-size", "8"]) in (None, 0)
    text = caplog.text
    assert "planned memory per GPU" in text
    assert "exceed the device's" in text and "largest that fits: 0" in text


def test_multi_source_webdataset_counts_each_folder_or_names_what_to_pass(tmp_path):
    from vladva_openclip.train._common import TrainInputError
    from vladva_openclip.train._wds import count_samples

    for folder, sizes in (("a", {"0.tar": 5, "1.tar": 7}), ("b", {"0.tar": 11})):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "sizes.json").write_text(json.dumps(sizes))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    urls = [f"{a}/0.tar", f"{a}/1.tar", f"{b}/0.tar"]
    assert count_samples(urls, "--train-num-samples") == 23  # open_clip read only a/sizes.json: KeyError '0.tar'
    (tmp_path / "c").mkdir()
    with pytest.raises(TrainInputError, match=r"--train-num-samples.*c/sizes.json"):
        count_samples(urls + [str(tmp_path / "c" / "0.tar")], "--train-num-samples")
    with pytest.raises(TrainInputError, match=r"no count for 1 shard\(s\) \(2.tar\)"):
        count_samples([f"{a}/2.tar"], "--train-num-samples")


def test_accumulation_gradient_pass_reuses_the_vision_tower_output():
    """--accum-freq 2 through open_clip_train's own loop: the vision tower runs once per micro-batch (in the caching
    pass) instead of twice, and the gradients are those of recomputing it."""
    import open_clip
    from conftest import perturb_trainables
    from open_clip_train.train import train_one_epoch
    from test_train import _fixed_batch

    from vladva_openclip.loss import VladVALoss

    model = open_clip.create_model("vladva-tiny-llava")
    perturb_trainables(model)
    tok = open_clip.get_tokenizer("vladva-tiny-llava")
    images, texts = _fixed_batch(model, tok, n=8)
    calls = {"n": 0}
    real = model.backbone.image_features

    def counted(lvlm, pixels):
        calls["n"] += 1
        return real(lvlm, pixels)

    model.backbone.image_features = counted

    class Loader(list):
        num_samples = 8

    def run(reuse):
        model.reuse_vision_features = reuse
        calls["n"] = 0
        captured = {}

        class Recorder(torch.optim.SGD):
            def step(self, closure=None):
                captured.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

        loader = Loader([(images[i:i + 4], texts[i:i + 4]) for i in (0, 4)])
        loader.num_batches = 2
        data = {"train": types.SimpleNamespace(dataloader=loader, set_epoch=lambda e: None)}
        args = types.SimpleNamespace(device="cpu", precision="fp32", accum_freq=2, distill=False,
                                     skip_scheduler=True, grad_clip_norm=None, log_every_n_steps=100, rank=0,
                                     local_rank=0, world_size=1, batch_size=4, wandb=False, save_logs=False,
                                     horovod=False, distributed=False)
        opt = Recorder([p for p in model.parameters() if p.requires_grad], lr=0.0)
        train_one_epoch(model, data, VladVALoss(accum_freq=2), 0, opt, None, None, None, args)
        return captured, calls["n"]

    (ref, ref_calls), (got, got_calls) = run(False), run(True)
    assert (ref_calls, got_calls) == (4, 2)
    assert not model._vision_cache  # every kept output was used and released
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-8)
