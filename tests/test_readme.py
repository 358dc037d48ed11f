"""The README stays true: every command it shows names a script that exists and flags that script accepts."""

from __future__ import annotations

import re
import runpy
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """Shell commands of the README's ```sh blocks, continuation lines joined, comments dropped, a line's commands
    joined by ``&&`` or ``;`` taken one by one, loop syntax (``for ... in ...``, ``do``, ``done``) left out."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    cmds = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("#"):
                continue
            for part in re.split(r"\s*(?:&&|;)\s*", line):
                part = re.sub(r"^do\s+", "", part)
                if part and part not in ("do", "done") and not re.match(r"for \w+ in ", part):
                    cmds.append(part)
    return cmds


def _flags(cmd: str) -> list[str]:
    # optional parts are shown in brackets and alternatives after "|": every --flag of the line must exist
    return sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", cmd)))


def _accepted(script: Path, capsys) -> str:
    """The --help text of a stage script, from its own parse_args."""
    ns = runpy.run_path(str(script), run_name="readme_check")
    with pytest.raises(SystemExit):
        ns["parse_args"](["--help"])
    return capsys.readouterr().out


COMMANDS = readme_commands()


def test_readme_has_commands():
    assert len(COMMANDS) >= 10
    assert any(c.startswith("make demo") for c in COMMANDS) and any(c.startswith("make test") for c in COMMANDS)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_command_is_real(cmd, capsys):
    words = shlex.split(cmd.replace("[", " ").replace("]", " ").replace("|", " "))
    if words[0] == "make":
        targets = re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), flags=re.M)
        assert words[1] in targets, cmd
        return
    while "=" in words[0]:  # VAR=value prefixes
        words.pop(0)
    assert words[0] in ("bash", "python", "torchrun"), f"a command this test does not check: {cmd}"
    script = next(w for w in words[1:] if w.endswith((".py", ".sh")))
    assert (ROOT / script).is_file(), f"README names a missing script: {script}"
    if script == "tools/gpu_bench.sh":  # its BENCH_FLAGS go to benchmark.py
        script = "code/benchmark.py"
        cmd = " ".join(re.findall(r'BENCH_FLAGS="([^"]*)"', cmd))
    if script.endswith(".py"):
        help_text = _accepted(ROOT / script, capsys)
        missing = [f for f in _flags(cmd) if f not in help_text and not f.startswith("--nproc")]
        missing = [f for f in missing if f not in ("--nnodes", "--node_rank", "--master_addr", "--master_port")]
        assert not missing, f"{script} does not accept {missing} (README: {cmd})"


def test_python_example_runs(gallery_copy, tiny_spm, tmp_path, capsys):
    """The README's Python blocks run as printed, with the paths and the model swapped for the test's tiny ones."""
    import torch

    from traffic_retrieval.modeling import create_model

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)
    assert blocks
    gallery = gallery_copy
    ckpt = tmp_path / "model.pth"
    torch.manual_seed(0)
    torch.save({"model": create_model("beit3_nano_patch16_32").state_dict()}, ckpt)
    swaps = {"my_gallery/": str(gallery), "beit3_large_patch16_384": "beit3_nano_patch16_32",
             "code/pt_out_car/checkpoint-best": str(ckpt), "code/pt_out_people/checkpoint-best": str(ckpt),
             "model_pth/beit3.spm": str(tiny_spm), 'device="cuda"': 'device="cpu"'}
    for block in blocks:
        for a, b in swaps.items():
            assert a in block, f"the README example no longer uses {a}: update this test's swaps"
            block = block.replace(a, b)
        exec(compile(block, "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("A black BESTUNE Sedan. [(")
    assert all(line.count(".jpg'") == 5 for line in lines)


def test_official_model_names_with_the_retrieval_suffix_are_accepted(load_script, tmp_path):
    # README "Models and weights": the official command lines say --model beit3_large_patch16_384_retrieval
    name = "beit3_large_patch16_384_retrieval"
    argvs = {"benchmark": [], "infer": [], "search": ["--images", "d", "--query", "q", "--finetune", "c.pth"],
             "extract_features": ["--finetune", "c.pth", "--texts", "t.txt", "--out", "o.npz"]}
    for script, argv in argvs.items():
        assert load_script(script)["parse_args"](["--model", name, *argv]).model == "beit3_large_patch16_384"
    cfg = load_script("run_beit3_finetuning")["parse_args"](["--category", "car", "--model", name])
    assert cfg.model.model == "beit3_large_patch16_384"
