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


def test_every_command_takes_log_level_and_a_bad_level_is_named():
    import typer

    cmd = typer.main.get_command(app)
    leaves = []

    def walk(c, path):
        if hasattr(c, "commands"):  # a group (typer may vendor its own click)
            for name, sub in c.commands.items():
                walk(sub, [*path, name])
        else:
            leaves.append((path, c))

    walk(cmd, [])
    assert len(leaves) >= 10
    for path, c in leaves:
        assert "--log-level" in {o for p in c.params for o in p.opts}, path
    code, out, r = _run("init-config", "--log-level", "chatty", "x.yaml")
    assert code == 2 and "--log-level 'chatty': expected one of DEBUG, INFO, WARNING, ERROR" in out


def test_help_imports_nothing_heavy():
    """`stepprobe --help` answers at once: no torch, pandas, transformers, TRL or pydantic."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from stepprobe.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = {'torch', 'pandas', 'transformers', 'trl', 'numpy', 'pydantic'} & set(sys.modules)\n"
        "print(sorted(heavy))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
