"""Strict loading of every checkpoint form, and the official 224 -> 384 position-table interpolation."""

from __future__ import annotations

import argparse

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from traffic_retrieval.checkpoint import (
    POS_KEY,
    CheckpointError,
    interpolate_pos_embed,
    load_checkpoint_file,
    load_weights,
    resolve_checkpoint_path,
)
from traffic_retrieval.modeling import create_model

NANO = "beit3_nano_patch16_32"


def test_interpolation_matches_timm_resampling():
    # 14x14 grid (224 px) -> 24x24 (384 px), three leading rows kept; timm's resampler is an independent implementation
    pos = torch.randn(3 + 14 * 14, 16)
    ours = interpolate_pos_embed(pos, 24 * 24)
    ref = resample_abs_pos_embed(pos[None], new_size=[24, 24], old_size=[14, 14], num_prefix_tokens=3,
                                 interpolation="bicubic", antialias=False)[0]
    assert ours.shape == (579, 16)
    assert torch.equal(ours[:3], pos[:3])
    assert (ours - ref).abs().max() < 1e-5
    assert interpolate_pos_embed(pos, 14 * 14) is pos  # same grid: untouched


def test_a_224_checkpoint_loads_into_a_384_model(tmp_path):
    # nano at 32 px has a 2x2 grid; the same weights at 64 px need a 4x4 grid
    small = create_model(NANO)
    torch.save({"model": small.state_dict()}, tmp_path / "small.pth")
    big = create_model(NANO, img_size=64)
    load_weights(big, tmp_path / "small.pth")
    sd = small.state_dict()
    assert torch.equal(big.state_dict()["beit3.encoder.embed_positions.B.weight"],
                       sd["beit3.encoder.embed_positions.B.weight"])  # the text table is never touched
    assert big.state_dict()[POS_KEY].shape == (3 + 16, 64)
    with torch.no_grad():
        assert big.encode_image(torch.randn(1, 3, 64, 64)).shape == (1, 64)


def test_deepspeed_layout_with_pickled_args(tmp_path):
    model = create_model(NANO)
    for epoch in (2, 10):
        d = tmp_path / f"checkpoint-{epoch}"
        d.mkdir()
        sd = {k: v.half() for k, v in model.state_dict().items()}  # DeepSpeed fp16 keeps the module in half precision
        torch.save({"module": sd, "epoch": epoch, "args": argparse.Namespace(lr=3e-5), "dp_world_size": 2,
                    "ds_version": "0.19.8"}, d / "mp_rank_00_model_states.pt")
    assert resolve_checkpoint_path(tmp_path).parent.name == "checkpoint-10"  # the newest tag, numerically
    fresh = create_model(NANO)
    sd = load_weights(fresh, tmp_path / "checkpoint-2")
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    ref = model.state_dict()
    assert all(torch.equal(fresh.state_dict()[k], ref[k].half().float()) for k in ref)


def test_a_plain_training_run_resolves_like_a_deepspeed_one(tmp_path):
    run = tmp_path / "pt_out_car"
    run.mkdir()
    with pytest.raises(CheckpointError, match="checkpoint-\\*.pth"):
        resolve_checkpoint_path(run)
    for name in ("checkpoint-best.pth", "checkpoint-2.pth", "checkpoint-10.pth", "notes.pth"):
        torch.save({"model": {}}, run / name)
    assert resolve_checkpoint_path(run) == run / "checkpoint-10.pth"  # the newest, numerically
    assert resolve_checkpoint_path(run / "checkpoint-best") == run / "checkpoint-best.pth"  # the tag name works too
    for name in ("checkpoint-2.pth", "checkpoint-10.pth"):
        (run / name).unlink()
    assert resolve_checkpoint_path(run) == run / "checkpoint-best.pth"
    with pytest.raises(FileNotFoundError, match="neither .*checkpoint-7 nor .*checkpoint-7.pth exists"):
        resolve_checkpoint_path(run / "checkpoint-7")


def test_ddp_prefix_is_stripped(tmp_path):
    model = create_model(NANO)
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "ddp.pth")
    fresh = create_model(NANO)
    load_weights(fresh, tmp_path / "ddp.pth")
    assert torch.equal(fresh.logit_scale, model.logit_scale)


def test_missing_unexpected_and_shape_errors_are_listed(tmp_path):
    sd = create_model(NANO).state_dict()
    sd.pop("vision_head.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["language_head.weight"] = torch.zeros(3, 3)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        load_weights(create_model(NANO), tmp_path / "bad.pth")
    msg = str(e.value)
    assert "bad.pth" in msg and "1 missing keys" in msg and "vision_head.weight" in msg
    assert "1 unexpected keys" in msg and "extra.weight" in msg
    assert "language_head.weight: checkpoint (3, 3) vs model (64, 64)" in msg


def test_wrong_model_size_is_named(tmp_path):
    torch.save({"model": create_model(NANO, depth=3).state_dict()}, tmp_path / "deeper.pth")
    with pytest.raises(CheckpointError, match=r"model size differs: checkpoint D=64, 3 layers, model D=64, 2 layers"):
        load_weights(create_model(NANO), tmp_path / "deeper.pth")


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_checkpoint_file(tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_weights(create_model(NANO), tmp_path / "nope.pth")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt"):
        resolve_checkpoint_path(tmp_path / "empty_dir")
    torch.save({"optimizer": {"x": 1}}, tmp_path / "noweights.pth")
    with pytest.raises(CheckpointError, match="no state dict|not a state dict"):
        load_weights(create_model(NANO), tmp_path / "noweights.pth")
