import json

import pytest

from partc.cli import build_parser, main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_prints_table_with_totals(capsys):
    code, out, err = run(capsys, "inspect", "torchvision:resnet18", "--input-shape", "1,3,224,224")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["name", "op", "output", "shape", "MFLOPs", "act", "KB", "params", "KB"]
    conv1 = next(line for line in lines if line.startswith("conv1 "))
    assert conv1.split()[:3] == ["conv1", "conv2d", "1x64x112x112"]
    assert lines[-1].startswith("69 layers, 3.6")
    assert "(1.814 GMACs)" in lines[-1]


def test_inspect_json(capsys):
    code, out, _ = run(capsys, "inspect", "tests/models.py:mlp", "--input-shape", "1,16", "--json")
    report = json.loads(out)
    assert code == 0
    assert report["inputs"] == ["1,16"] and report["tracer"] == "torch.fx"
    assert report["totals"]["macs"] == 16 * 32 + 32 * 32 + 32 * 4
    assert [layer["op"] for layer in report["layers"]] == ["linear", "relu", "linear", "relu", "linear"]


def test_dump_after_trace_writes_json_and_dot(capsys, tmp_path):
    code, _, _ = run(capsys, "inspect", "tests/models.py:residual", "--input-shape", "1,8,16,16",
                     "--dump-after", "trace", "--dump-dir", str(tmp_path))
    assert code == 0
    ir = json.loads((tmp_path / "00-trace.json").read_text())
    add = next(n for n in ir["nodes"] if n["name"] == "add")
    assert add["inputs"] == ["x", "conv2"] and add["meta"]["partc.shape"] == [1, 8, 16, 16]
    dot = (tmp_path / "00-trace.dot").read_text()
    assert dot.startswith("digraph partc {") and '"conv2" -> "add";' in dot


@pytest.mark.parametrize(
    ("argv", "stderr"),
    [
        (["inspect", "torchvision:resnet5", "--input-shape", "1,3,224,224"],
         "partc: error: model 'torchvision:resnet5': unknown torchvision model; did you mean resnet50, resnet152, "
         "resnet34?\n"),
        (["inspect", "tests/models.py:broken", "--input-shape", "1,3"],
         "partc: error: model 'tests/models.py:broken': factory raised RuntimeError: weights file missing\n"),
        (["inspect", "tests/models.py:mlp", "--input-shape", "1,15"],
         "partc: error: layer '_0' (linear) rejects its input: mat1 and mat2 shapes cannot be multiplied "
         "(1x15 and 16x32); check --input-shape\n"),
        (["inspect", "tests/models.py:mlp", "--input-shape", "1,16", "--dump-after", "no-such-pass"],
         "partc: error: unknown pass 'no-such-pass'; passes are: trace"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, stderr):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith(stderr) and err.count("\n") == 1


def test_untraceable_model_is_one_line(capsys):
    code, _, err = run(capsys, "inspect", "tests/models.py:value_branch", "--input-shape", "1,4")
    assert code == 2
    assert err.startswith("partc: error: ValueBranch cannot be traced: torch.fx: ") and err.count("\n") == 1


def test_help_teaches_model_syntax(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "torchvision:NAME" in out and "partc inspect torchvision:resnet50 --input-shape 1,3,224,224" in out


def test_version_and_flags_anywhere_on_the_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("partc 0.")
    for argv in (["--debug", "-q", "-vv", "inspect", "m.py:f", "--input-shape", "1"],
                 ["inspect", "m.py:f", "--input-shape", "1", "--debug", "-q", "-vv"],
                 ["-v", "inspect", "m.py:f", "--input-shape", "1", "--debug", "-q", "-v"]):
        args = build_parser().parse_args(argv)
        verbose = 2 if "-vv" in argv else 1
        assert (args.debug, args.quiet, args.verbose, args.command) == (True, True, verbose, "inspect")
    args = build_parser().parse_args(["inspect", "m.py:f", "--input-shape", "1"])
    assert (args.debug, args.quiet, args.verbose) == (False, False, 0)


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["profile", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "timed runs (default: 15)" in out and "where --dump-after writes (default: partc-dump)" in out


def test_targets_lists_targets_and_backends(capsys):
    code, out, _ = run(capsys, "targets")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["target", "kind", "cores"]
    assert any(line.startswith("rpi4 ") for line in out.splitlines())
    assert any(line.split()[:2] == ["torchscript", ".pt"] for line in out.splitlines())
    code, out, _ = run(capsys, "targets", "rpi4")
    assert code == 0 and "Raspberry Pi 4 Model B product brief" in out


def test_run_flags_that_need_distributed(capsys, tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    code, _, err = run(capsys, "run", str(tmp_path), "--window", "2")
    assert code == 2 and "partc: error:" in err
