"""Rank helpers in one process, and the contrastive loss across two real processes (torchrun, gloo, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from traffic_retrieval import distributed as D
from traffic_retrieval.loss import ContrastiveLoss

SCRIPT = Path(__file__).parent / "dist_scripts" / "loss_grads.py"
DS_SCRIPT = Path(__file__).parent / "dist_scripts" / "deepspeed_step.py"
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# float32 throughout: summation order differs between 2 ranks and 1 process, so the match is to rounding.
ATOL = RTOL = 1e-6


@pytest.fixture
def clean_env(monkeypatch):
    """No torchrun variables; whatever the test sets is undone (monkeypatch only restores variables it has seen)."""
    for var in TORCHRUN_VARS:
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    yield monkeypatch
    D.cleanup()


def test_single_process_defaults(clean_env):
    info = D.init_distributed()
    assert info == D.DistInfo(rank=0, world_size=1, local_rank=0, distributed=False)
    assert (D.get_rank(), D.get_world_size(), D.is_main_process()) == (0, 1, True)
    D.barrier()  # no-op without a process group
    t = torch.randn(3, 4, requires_grad=True)
    assert D.all_gather_with_grad(t) is t
    gathered = D.all_gather_concat(t)
    assert torch.equal(gathered, t) and not gathered.requires_grad
    D.cleanup()


def test_incomplete_env_is_an_error(clean_env):
    clean_env.setenv("RANK", "0")
    with pytest.raises(ValueError, match="WORLD_SIZE, LOCAL_RANK not set"):
        D.init_distributed()


def test_single_process_env_for_deepspeed(clean_env):
    values = D.set_single_process_env()
    assert {k: os.environ[k] for k in TORCHRUN_VARS} == values
    assert values["RANK"] == "0" and values["WORLD_SIZE"] == "1" and values["LOCAL_RANK"] == "0"
    assert values["MASTER_ADDR"] == "127.0.0.1" and 1024 <= int(values["MASTER_PORT"]) < 65536
    # A world of one really starts from these variables (gloo), and cleanup leaves no group behind.
    try:
        info = D.init_distributed()
        assert info == D.DistInfo(rank=0, world_size=1, local_rank=0, distributed=False)
        assert torch.distributed.is_initialized() and D.get_world_size() == 1
    finally:
        D.cleanup()
    assert not torch.distributed.is_initialized()


def test_backend_follows_the_device_not_the_machine(clean_env):
    """nccl only for a job on GPUs: a --device cpu job on a machine with CUDA needs gloo (nccl cannot carry CPU
    tensors)."""
    assert (D.backend_for("cuda"), D.backend_for("cpu")) == ("nccl", "gloo")
    clean_env.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as the choice can tell
    D.set_single_process_env()
    D.init_distributed(device_type="cpu")
    assert torch.distributed.get_backend() == "gloo"


def test_single_process_env_leaves_torchrun_alone(clean_env):
    clean_env.setenv("RANK", "1")
    assert D.set_single_process_env() == {}
    assert "WORLD_SIZE" not in os.environ


def _torchrun(script: Path, world: int, *args: str) -> None:
    """Run ``script`` on ``world`` CPU processes (gloo) on a free port; fail with the output's tail."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    for var in TORCHRUN_VARS:
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={world}",
           "--master_addr=127.0.0.1", f"--master_port={D.free_port()}", str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _reference(inputs: dict, gather: bool, dedup: bool, ids: torch.Tensor | None, codes: torch.Tensor | None,
               world: int) -> dict:
    """Gradients of one process on the whole batch (or, for gather=False, of each half on its own)."""
    w_img = inputs["w_img"].clone().requires_grad_(True)
    w_txt = inputs["w_txt"].clone().requires_grad_(True)
    scale = inputs["logit_scale"].clone().requires_grad_(True)
    img = F.normalize(inputs["x_img"] @ w_img.T, dim=-1)
    txt = F.normalize(inputs["x_txt"] @ w_txt.T, dim=-1)
    img.retain_grad()
    txt.retain_grad()
    loss_fn = ContrastiveLoss(gather=gather, dedup=dedup)
    if gather:
        loss = loss_fn(img, txt, scale, ids, codes)
        losses = [loss]
    else:  # every rank alone on its half; DDP still averages the parameter gradients
        halves = torch.arange(img.shape[0]).chunk(world)
        losses = [loss_fn(img[h], txt[h], scale, None if ids is None else ids[h]) for h in halves]
        loss = torch.stack(losses).mean()
    loss.backward()
    return {"losses": [l.detach() for l in losses], "img_grad": img.grad, "txt_grad": txt.grad,
            "w_img_grad": w_img.grad, "w_txt_grad": w_txt.grad, "scale_grad": scale.grad}


def test_two_process_loss_and_gradients_match_one_process(tmp_path):
    # Import the case table from the launched script itself (by file path, no sys.path edit).
    import importlib.util

    spec = importlib.util.spec_from_file_location("loss_grads", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    world = 2
    _torchrun(SCRIPT, world, "--out", str(tmp_path))

    inputs = torch.load(tmp_path / "inputs.pt")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for r, res in enumerate(ranks):
        assert res["info"] == (r, world, r, True)
        assert res["is_main"] == (r == 0)
        # all_gather_concat with 1 row on rank 0 and 2 rows on rank 1, floats and longs
        assert torch.equal(res["concat"], torch.tensor([[0.0] * 3, [1.0] * 3, [1.0] * 3]))
        assert torch.equal(res["concat_ids"], torch.tensor([0, 1, 10, 11, 12]))
        gathered, x_grad = res["gather_with_grad"]
        assert torch.equal(gathered, torch.ones(4, 3))
        assert torch.equal(x_grad, torch.full((2, 3), 3.0))  # rank weights 1 + 2, summed by the backward all_reduce

    rows = torch.arange(script.GLOBAL_BATCH).chunk(world)
    for name, (gather, dedup, ids, codes) in script.CASES.items():
        ref = _reference(inputs, gather, dedup, ids, codes, world)
        got = [res["cases"][name] for res in ranks]
        if gather:
            # The global loss is the mean of the ranks' losses (equal local batches).
            mean_loss = torch.stack([g["loss"] for g in got]).mean()
            torch.testing.assert_close(mean_loss, ref["losses"][0], atol=ATOL, rtol=RTOL)
        else:
            for g, l in zip(got, ref["losses"]):
                torch.testing.assert_close(g["loss"], l, atol=ATOL, rtol=RTOL)
        for r, g in enumerate(got):
            # A rank's feature gradient is that of the SUM of all ranks' losses (the backward all_reduce); the
            # reference differentiates their mean, the quantity whose parameter gradient DDP's average gives.
            for key in ("img_grad", "txt_grad"):
                torch.testing.assert_close(g[key] / world, ref[key][rows[r]], atol=ATOL, rtol=RTOL,
                                           msg=f"{name} {key} rank {r}")
            for key in ("w_img_grad", "w_txt_grad", "scale_grad"):
                torch.testing.assert_close(g[key], ref[key], atol=ATOL, rtol=RTOL, msg=f"{name} {key} rank {r}")

    # The cases themselves differ where they should: duplicates change the loss, distinct ids do not.
    losses = {name: ranks[0]["cases"][name]["loss"] for name in script.CASES}
    torch.testing.assert_close(losses["distinct"], losses["official"], atol=1e-7, rtol=0)
    torch.testing.assert_close(losses["dups_no_dedup"], losses["official"], atol=1e-7, rtol=0)
    assert abs(losses["dups"] - losses["official"]) > 1e-3
    assert abs(losses["relevance"] - losses["official"]) > 1e-3


def test_two_process_deepspeed_zero1_starts_from_rank0_and_stays_in_sync(tmp_path):
    """DeepSpeed ZeRO-1 (bf16) on 2 ranks whose models start different (a matrix and the 0-d logit_scale, which
    DeepSpeed 0.19.8 cannot broadcast itself): after init both hold rank 0's weights, after 2 steps on different
    data both still hold identical weights."""
    _torchrun(DS_SCRIPT, 2, "--out", str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for key, start in r0["start"].items():
        assert torch.equal(r0["after_init"][key], start.bfloat16().float()), key  # rank 0's values, in bf16
        assert torch.equal(r1["after_init"][key], r0["after_init"][key]), key
    assert list(r0["final"]) == list(r1["final"])
    for key in r0["final"]:
        assert torch.equal(r0["final"][key], r1["final"][key]), key
    assert not torch.equal(r0["final"]["vision_head.weight"], r0["after_init"]["vision_head.weight"])  # it trained
