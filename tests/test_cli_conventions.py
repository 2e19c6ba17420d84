"""Every pipeline command follows the same CLI conventions: ``--help`` shows examples and exits 0, a missing
required argument is an argparse usage error (exit 2), a nonexistent input file is one line on stderr, exit 1,
no traceback."""
import pytest

from heart_onnx.cli.main import COMMANDS, build_parser, main

# a command line whose required arguments are missing (argparse: exit 2); demo has no required argument
MISSING = {
    "inspect": [], "analyze": ["--model", "demo-vit"], "plan": ["sens.npz"], "prune": ["m.onnx"],
    "verify": ["m.onnx", "--model", "demo-vit"], "bench": [], "sweep": ["--models", "pythia-70m"],
    "finetune": ["--model", "demo-vit", "-o", "ft.pt"], "demo": ["--no-such-option"],
}


def _nonexistent(cmd: str, d) -> list[str] | None:
    """A command line naming input files that do not exist (None: the command reads no input file)."""
    nope = d / "nope"
    return {
        "inspect": ["inspect", f"{nope}.onnx"],
        "analyze": ["analyze", "--model", "demo-vit", "--weights", f"{nope}.pt", "-o", f"{d}/s.npz"],
        "plan": ["plan", f"{nope}.npz", "--budget", "0.1", "-o", f"{d}/p.json"],
        "prune": ["prune", f"{nope}.onnx", f"{nope}.json", "-o", f"{d}/o.onnx"],
        "verify": ["verify", f"{nope}.onnx", "--model", "demo-vit", "--plan", f"{nope}.json"],
        "bench": ["bench", f"{nope}.onnx", "--repeats", "1", "--warmup", "0"],
        "sweep": ["sweep", "--models", "pythia-70m", "--plan", f"{nope}.json", "-o", f"{d}/sweep", "--quiet"],
        "finetune": ["finetune", "--model", "demo-vit", "--plan", f"{nope}.json", "-o", f"{d}/ft.pt"],
        "demo": None,
    }[cmd]


def test_every_command_is_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_shows_examples_and_exits_0(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "examples:" in out and f"heart-onnx {cmd}" in out.split("examples:", 1)[1], out


@pytest.mark.parametrize("cmd", COMMANDS)
def test_missing_required_argument_exits_2(cmd, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([cmd, *MISSING[cmd]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage:" in err and "Traceback" not in err, err


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c != "demo"])
def test_nonexistent_input_is_one_line_exit_1(cmd, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("HEART_ONNX_DEBUG", raising=False)
    argv = _nonexistent(cmd, tmp_path)
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert rc == 1, (out, err)
    assert len(lines) == 1 and lines[0].startswith(f"heart-onnx {cmd}: error:"), err
    assert "nope" in lines[0] and "Traceback" not in err and "internal error" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written
