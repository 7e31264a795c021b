"""The trainer: open_clip_train's loop with the AR loss, on the tiny model, CPU."""
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import perturb_trainables

REPO = Path(__file__).resolve().parents[1]


def _base_args(tmp_path, name="run", *extra):
    return ["--model", "vladva-tiny-llava", "--dataset-type", "synthetic", "--synthetic-size", "48",
            "--batch-size", "8", "--workers", "0", "--logs", str(tmp_path), "--name", name, "--precision", "fp32",
            "--lr", "1e-2", "--warmup", "0", "--seed", "0", "--max-short-len", "24", "--max-long-len", "64",
            "--log-every-n-steps", "1", "--report-to", "", *extra]


def _fixed_batch(model, tok, n=16, seed=0, split="train"):
    """Preprocessed images and packed captions of the first ``n`` scenes of a synthetic world split (by default
    the ones ``--dataset-type synthetic --seed 0`` trains on)."""
    import open_clip

    from vladva_openclip.synth import World, WorldConfig

    _, _, preprocess = open_clip.create_model_and_transforms("vladva-tiny-llava")
    world = World(WorldConfig(seed=seed))
    samples = [world.sample(split, i) for i in range(n)]
    images = torch.stack([preprocess(world.render(s.scene)) for s in samples])
    short = tok([s.short for s in samples], context_length=64)
    long = tok.long_captions([s.long for s in samples], context_length=64)
    return images, torch.stack([short, long], 1)


def _losses(model, loss_fn, batch):
    with torch.no_grad():
        out = model(*batch)
        return {k: float(v) for k, v in loss_fn(**out, output_dict=True).items()}


def test_short_run_both_losses_fall_and_final_adapter_loads(tmp_path):
    import open_clip

    from vladva_openclip.loss import VladVALoss
    from vladva_openclip.train.main import main

    assert main(_base_args(tmp_path, "run", "--epochs", "6")) in (None, 0)
    ckpts = sorted(glob.glob(str(tmp_path / "run" / "checkpoints" / "epoch_*.pt")))
    assert ckpts and ckpts[-1].endswith("epoch_6.pt")
    state = torch.load(ckpts[-1], weights_only=True)["state_dict"]
    base = open_clip.create_model("vladva-tiny-llava").eval()
    # Checkpoints hold only what trains (adapter-sized).
    assert set(state) == set(base.trainable_state_dict())
    trained = open_clip.create_model("vladva-tiny-llava", pretrained=ckpts[-1]).eval()
    tok = open_clip.get_tokenizer("vladva-tiny-llava")
    preprocess_free = _fixed_batch(base, tok)
    loss_fn = VladVALoss()
    before, after = _losses(base, loss_fn, preprocess_free), _losses(trained, loss_fn, preprocess_free)
    assert after["contrastive_loss"] < before["contrastive_loss"] * 0.95, (before, after)
    # The random tiny base has a frozen random lm_head, so LoRA moves the next-token loss slowly; the evaluation is
    # deterministic (same batch, same weights), so a drop of 0.02 nats is a real decrease, not noise.
    assert after["ar_loss"] < before["ar_loss"] - 0.02, (before, after)
    log = (tmp_path / "run" / "out.log").read_text()
    assert "Ar_loss" in log and "Contrastive_loss" in log


def test_optimizer_groups_and_lr_scale(tmp_path):
    import open_clip

    from vladva_openclip.train.main import assign_learning_rate, param_groups

    model = open_clip.create_model("vladva-tiny-llava")
    groups = param_groups(model, weight_decay=0.2, soft_prompt_lr_scale=10.0)
    assert [g["name"] for g in groups] == ["lora", "logit_scale", "soft_prompt"]
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0, 0.0]
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == n_trainable
    opt = torch.optim.AdamW(groups, lr=1.0)
    assign_learning_rate(opt, 1e-3)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3, pytest.approx(1e-2)]


def test_resumable_loader_skips_reports_boundaries_and_shows_progress(capsys, monkeypatch):
    from vladva_openclip.train.main import ResumableLoader

    monkeypatch.setenv("VLADVA_PROGRESS_INTERVAL", "0")  # not a terminal: a line per update instead of redraws

    class Loader(list):
        num_batches, num_samples = 6, 48

    seen = []
    loader = ResumableLoader(Loader(range(6)), skip=2, on_step_boundary=seen.append, progress="epoch 3")
    assert len(loader) == 4
    assert list(loader) == [2, 3, 4, 5]
    assert seen == [3, 4, 5]  # between batches only: never before the first one after a resume
    bar = capsys.readouterr().err
    assert "epoch 3" in bar and "2/6" in bar  # the bar starts with the skipped batches counted as done
    assert list(ResumableLoader(Loader(range(3)), 0, None)) == [0, 1, 2]
    assert capsys.readouterr().err == ""  # no bar unless asked


def test_open_clip_train_logging_setup_is_undone_after_a_run(tmp_path):
    import logging

    from open_clip_train.logger import setup_logging

    from vladva_openclip.train.main import restored_root_logging

    hf = logging.getLogger("transformers")
    hf_level, root_handlers = hf.level, list(logging.getLogger().handlers)
    with restored_root_logging():
        setup_logging(str(tmp_path / "out.log"), logging.INFO)  # what open_clip_train's main() does
        assert hf.level == logging.INFO and len(logging.getLogger().handlers) == len(root_handlers) + 2
    assert hf.level == hf_level  # transformers does not stay at INFO (printing every model config)
    assert logging.getLogger().handlers == root_handlers


def test_accumulation_is_exact(tmp_path):
    """open_clip's two-pass accumulation (--accum-freq 2) gives the full-batch gradient for LoRA and prompts."""
    import types

    import open_clip
    from open_clip_train.train import train_one_epoch

    from vladva_openclip.loss import VladVALoss

    tok = open_clip.get_tokenizer("vladva-tiny-llava")
    model = open_clip.create_model("vladva-tiny-llava")
    perturb_trainables(model)
    images, texts = _fixed_batch(model, tok, n=8)

    class Loader(list):
        num_samples = 8

    def run(accum):
        captured = {}

        class Recorder(torch.optim.SGD):
            def step(self, closure=None):
                for n, p in model.named_parameters():
                    if p.grad is not None:
                        captured[n] = p.grad.clone()

        opt = Recorder([p for p in model.parameters() if p.requires_grad], lr=0.0)
        per = 8 // accum
        loader = Loader([(images[i:i + per], texts[i:i + per]) for i in range(0, 8, per)])
        loader.num_batches = len(loader)
        data = {"train": types.SimpleNamespace(dataloader=loader, set_epoch=lambda e: None)}
        args = types.SimpleNamespace(device="cpu", precision="fp32", accum_freq=accum, distill=False,
                                     skip_scheduler=True, grad_clip_norm=None, log_every_n_steps=100, rank=0,
                                     local_rank=0, world_size=1, batch_size=per, wandb=False, save_logs=False,
                                     horovod=False, distributed=False)
        train_one_epoch(model, data, VladVALoss(), 0, opt, None, None, None, args)
        return captured

    full, accumulated = run(1), run(2)
    assert set(full) == set(accumulated)
    for name in full:
        if name == "logit_scale":
            # open_clip sums logit_scale's gradient over the accum_freq passes (upstream behaviour, also for CLIP).
            torch.testing.assert_close(accumulated[name], 2 * full[name], rtol=1e-4, atol=1e-7)
            continue
        # fp32 summation order differs between one pass and two; compare relative to the gradient's scale.
        err = (accumulated[name] - full[name]).abs().max() / full[name].abs().max()
        assert err < 1e-4, (name, float(err))


def test_resume_after_kill_continues_exactly(tmp_path, monkeypatch):
    """A run killed mid-epoch and resumed with --resume latest ends where an uninterrupted run ends."""
    from vladva_openclip.train import main as train_main

    args = ["--epochs", "2", "--save-every-n-steps", "2"]
    assert train_main.main(_base_args(tmp_path, "straight", *args)) in (None, 0)
    straight = torch.load(tmp_path / "straight" / "checkpoints" / "epoch_2.pt", weights_only=True)["state_dict"]

    calls = {"n": 0}
    real_step = train_main.GuardedAdamW.step

    def dying_step(self, closure=None):
        calls["n"] += 1
        if calls["n"] == 9:  # 6 steps per epoch: dies in epoch 1, after its step checkpoint at step 2
            raise KeyboardInterrupt("simulated kill")
        return real_step(self, closure)

    monkeypatch.setattr(train_main.GuardedAdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_main.main(_base_args(tmp_path, "killed", *args))
    monkeypatch.setattr(train_main.GuardedAdamW, "step", real_step)
    saved = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "killed" / "checkpoints" / "*.pt")))
    assert "epoch_1_step_2.pt" in saved and "epoch_2.pt" not in saved
    assert not any(".tmp" in p for p in saved)
    assert train_main.main(_base_args(tmp_path, "killed", *args, "--resume", "latest")) in (None, 0)
    resumed = torch.load(tmp_path / "killed" / "checkpoints" / "epoch_2.pt", weights_only=True)["state_dict"]
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-5, atol=1e-7, msg=k)


def test_nonfinite_steps_are_skipped_then_stop():
    from vladva_openclip.train.main import GuardedAdamW

    p = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([p], max_in_a_row=2, lr=0.1)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and p.grad is None and opt.skipped_steps == 1
    p.grad = torch.ones(3)
    opt.step()
    assert not torch.equal(p.detach(), torch.ones(3)) and opt.nonfinite_in_a_row == 0
    for _ in range(1):
        p.grad = torch.full((3,), float("inf"))
        opt.step()
    p.grad = torch.full((3,), float("inf"))
    with pytest.raises(FloatingPointError, match="in a row"):
        opt.step()


def test_corrupt_and_missing_images_are_skipped_and_counted(tmp_path, caplog):
    import logging

    from PIL import Image

    from vladva_openclip.train.main import main

    rows = ["filepath,title,long_caption"]
    for i in range(16):
        path = tmp_path / f"img{i}.png"
        if i == 3:
            path.write_bytes(b"this is not a png")
        elif i != 7:
            Image.new("RGB", (40, 40), (i * 10, 100, 200 - i * 5)).save(path)
        rows.append(f"{path},a shape number {i},a long description of shape number {i} and its colour")
    csv = tmp_path / "train.csv"
    csv.write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING):
        result = main(["--model", "vladva-tiny-llava", "--train-data", str(csv), "--dataset-type", "csv",
                       "--csv-separator", ",", "--batch-size", "4", "--workers", "0", "--epochs", "1",
                       "--logs", str(tmp_path / "logs"), "--name", "csv", "--precision", "fp32", "--lr", "1e-3",
                       "--report-to", ""])
    assert result in (None, 0)
    assert (tmp_path / "logs" / "csv" / "checkpoints" / "epoch_1.pt").is_file()
    text = caplog.text + (tmp_path / "logs" / "csv" / "out.log").read_text()
    assert "img3.png" in text and "img7.png" in text
    assert "skipped" in text.lower()


@pytest.mark.distributed
def test_two_process_gather_matches_single_process(tmp_path):
    out = tmp_path / "dist.json"
    # the script's folder heads sys.path under torchrun: name this checkout, or the installed package is imported
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(REPO / "tests" / "scripts" / "dist_loss_check.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) == {"gather_with_grad", "local_loss+gather_with_grad"}
    for mode, r in report.items():
        for key, ref in r["loss_ref"].items():
            assert r["loss_dist"][key] == pytest.approx(ref, rel=1e-5, abs=1e-6), (mode, key)
        assert r["max_rel_grad_err"] < 1e-4, (mode, r)
        assert r["n_grads"] > 10


def test_bf16_base_with_fp32_trainables_and_grad_checkpointing(tmp_path):
    """--precision amp_bf16: the frozen base is bfloat16, LoRA/prompts/logit_scale stay float32; checkpointing on."""
    from vladva_openclip.train import main as train_main

    seen = {}
    real = train_main.GuardedAdamW.step

    def spy(self, closure=None):
        seen["dtypes"] = {p.dtype for g in self.param_groups for p in g["params"]}
        return real(self, closure)

    train_main.GuardedAdamW.step = spy
    try:
        args = _base_args(tmp_path, "bf16", "--epochs", "1", "--grad-checkpointing")
        args[args.index("--precision") + 1] = "amp_bf16"
        assert train_main.main(args) in (None, 0)
    finally:
        train_main.GuardedAdamW.step = real
    assert seen["dtypes"] == {torch.float32}
    import open_clip

    m = open_clip.create_model("vladva-tiny-llava", precision="amp_bf16")
    assert m.lvlm.model.language_model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.bfloat16
    assert {p.dtype for p in m.trainable_state_dict().values()} == {torch.float32}
    s = m.cfg.image_size
    assert m.encode_image(torch.randn(1, 3, s, s)).dtype == torch.float32
