"""CLI bad input: exit code 2, a message naming the path, no traceback, nothing written."""

from typer.testing import CliRunner

from stepprobe.cli import app


def _run(*args):
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, " ".join(r.output.split()), r


def test_demo_out_that_is_a_file(tmp_path):
    f = tmp_path / "plain-file"
    f.write_text("x")
    code, out, r = _run("demo", "run", "--out", str(f), "--no-study")
    assert code == 2 and "is a file; expected a demo directory" in out
    assert str(f) in "".join(out.split())
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert f.read_text() == "x"


def test_an_os_refusal_names_the_path_instead_of_a_traceback(tmp_path):
    f = tmp_path / "plain-file"
    f.write_text("x")
    target = f / "study.yaml"  # a path "under" a regular file: the OS refuses it
    code, out, r = _run("init-config", str(target))
    # rich wraps long paths across lines: compare without whitespace
    assert code == 2 and str(target) in "".join(out.split()) and "Not a directory" in out
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)


def test_missing_and_malformed_config(tmp_path):
    code, out, _ = _run("run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o"))
    assert code == 2 and "nope.yaml: config file not found" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("checkpoints: [\n")
    code, out, _ = _run("run", str(bad), "--out", str(tmp_path / "o"))
    assert code == 2 and "bad.yaml: not valid YAML" in out
    assert not (tmp_path / "o").exists()
