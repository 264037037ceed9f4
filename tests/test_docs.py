"""The docs stay honest: every command line in docs/*.md and README.md exists, the benchmarks page is generated, completion works."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PROGRAMS = ("edgellm", "edgellm-agent", "edgellm-server")
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "sh-session"}
WRAPPERS = {"sudo", "exec", "nohup", "env", "time", "$"}
PLACEHOLDER = re.compile(r"^[A-Z_]+$|[<>\[\]{}|]|\.\.\.|…")


def _cli(prog: str) -> click.Command:
    if prog == "edgellm":
        from edgellm.cli import main
    elif prog == "edgellm-agent":
        from agent.cli import main
    else:
        from server.cli import main
    return main


def shell_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command line) of every shell code block, continuation lines joined."""
    out: list[tuple[int, str]] = []
    fence: str | None = None
    pending, start = "", 0
    for no, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*(```+|~~~+)\s*([\w-]*)", line)
        if m and fence is None:
            fence = m.group(1) if m.group(2).lower() in SHELL_LANGS else "skip:" + m.group(1)
            continue
        if m and fence is not None and m.group(1).startswith(fence.removeprefix("skip:")) and not m.group(2):
            fence = None
            continue
        if fence is None or fence.startswith("skip:"):
            continue
        if not pending:
            start = no
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def invocations(line: str) -> list[list[str]]:
    """Argument lists that start with one of the three programs (after wrappers and VAR=value)."""
    try:
        lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;()")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens = list(lexer)
    except ValueError:
        return []
    found: list[list[str]] = []
    segment: list[str] = []
    for tok in [*tokens, ";"]:
        if tok and set(tok) <= set("|&;()"):
            found.append(segment)
            segment = []
        else:
            segment.append(tok)
    calls = []
    for seg in found:
        i = 0
        while i < len(seg) and (seg[i] in WRAPPERS or re.match(r"^[A-Za-z_]+=", seg[i])):
            if seg[i] in WRAPPERS:  # sudo -u edgellm edgellm-agent ...
                i += 1
                while i < len(seg) and seg[i].startswith("-"):
                    i += 2 if seg[i] in ("-u", "-g") else 1
                continue
            value = seg[i].partition("=")[2]
            if Path(value).name in PROGRAMS:  # ExecStart=/usr/bin/edgellm-agent run ...
                seg = [value, *seg[i + 1 :]]
                i = 0
                break
            i += 1
        if i < len(seg) and Path(seg[i]).name in PROGRAMS:
            calls.append([Path(seg[i]).name, *seg[i + 1 :]])
    return calls


def _option(cmd: click.Command, name: str) -> click.Option | None:
    for p in cmd.params:
        if isinstance(p, click.Option) and name in (*p.opts, *p.secondary_opts):
            return p
    return None


def check(argv: list[str]) -> list[str]:
    """Problems with one invocation: an unknown (sub)command, or a --flag its command doesn't have."""
    cmd: click.Command = _cli(argv[0])
    path = [argv[0]]
    problems = []
    args = iter(argv[1:])
    for tok in args:
        if tok.startswith("-") and tok != "-":
            name = tok.partition("=")[0]
            opt = _option(cmd, name)
            if opt is None and name not in ("--help", "-h"):
                if name.startswith("--"):
                    problems.append(f"{' '.join(path)} has no option {name}")
                continue
            if opt is not None and "=" not in tok and not opt.is_flag and not opt.count:
                next(args, None)  # the option's value
            continue
        if isinstance(cmd, click.Group):
            if PLACEHOLDER.search(tok):
                return problems  # `edgellm-server rollout ACTION ...`: a placeholder, not a command
            sub = cmd.commands.get(tok)
            if sub is None:
                return [*problems, f"{' '.join(path)} has no command {tok!r}"]
            cmd = sub
            path.append(tok)
    return problems


def doc_invocations() -> list[tuple[str, list[str]]]:
    found = []
    for md in [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]:
        for no, line in shell_lines(md.read_text()):
            for argv in invocations(line):
                found.append((f"{md.relative_to(ROOT)}:{no}", argv))
    return found


def test_every_command_line_in_the_docs_exists() -> None:
    found = doc_invocations()
    assert len(found) > 30, "the guides show commands; the scanner found almost none"
    problems = [f"{where}: {p}" for where, argv in found for p in check(argv)]
    assert not problems, "docs name commands or flags that do not exist:\n" + "\n".join(problems)


def test_the_checker_catches_what_is_wrong() -> None:
    text = textwrap.dedent("""\
        ```bash
        edgellm bundle verify x.bundle --root root.json --no-such-flag   # comment --nor-this
        sudo -u edgellm edgellm-agent status --data-dir d && edgellm frobnicate
        edgellm-server rollout ACTION --data-dir srv
        ```
        ```python
        run(["edgellm", "frobnicate"])
        ```
        """)
    calls = [argv for _, line in shell_lines(text) for argv in invocations(line)]
    assert [c[:2] for c in calls] == [
        ["edgellm", "bundle"],
        ["edgellm-agent", "status"],
        ["edgellm", "frobnicate"],
        ["edgellm-server", "rollout"],
    ]
    assert check(calls[0]) == ["edgellm bundle verify has no option --no-such-flag"]
    assert check(calls[1]) == []
    assert check(calls[2]) == ["edgellm has no command 'frobnicate'"]
    assert check(calls[3]) == []
    unit = "ExecStart=/usr/local/bin/edgellm-agent run --data-dir /var/lib/x --listn 1"
    assert check(invocations(unit)[0]) == ["edgellm-agent run has no option --listn"]


FAKE_OK = '''\
"""A fake benchmark."""
import sys
if "--help" in sys.argv:
    print("usage: bench_a.py [--quick]")
    sys.exit(0)
print("args:", sys.argv[1:])
print("a vs b: 2.50x  ```fence``` inside")
'''
FAKE_FAIL = """\
import sys
if "--help" in sys.argv:
    print("usage: bench_b.py")
    sys.exit(0)
print("partial line")
print("Traceback: broke because the broker is missing", file=sys.stderr)
sys.exit(3)
"""


def test_report_writes_one_section_per_script_and_reports_failures(tmp_path: Path) -> None:
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "bench_a.py").write_text(FAKE_OK)
    (bench / "bench_b.py").write_text(FAKE_FAIL)
    (bench / "helper.py").write_text("raise SystemExit('not a benchmark: must not run')\n")
    out = tmp_path / "page.md"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "_report.py"),
            "--benchmarks",
            str(bench),
            "--out",
            str(out),
            "--bandwidth-seconds",
            "0.05",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 1, r.stderr  # one script failed: the page is written, the run says so
    page = out.read_text()
    assert page.startswith("# Benchmarks")
    assert "`make bench` regenerates this page" in page
    assert "Scripts: 2, failed: 1 (bench_b.py)." in page
    assert "helper.py" not in page
    a, b = page.index("## bench_a.py"), page.index("## bench_b.py")
    assert a < b
    sec_a, sec_b = page[a:b], page[b:]
    machine = r"Machine: \d+ cores \(.*\), memory bandwidth [\d.]+ GB/s measured"
    assert re.search(machine + r".*; load average [\d.]+ [\d.]+ [\d.]+ \(1/5/15 min\) when", page)
    assert re.search(
        machine + r".*; load average \(1/5/15 min\) [\d.]+ [\d.]+ [\d.]+ before, [\d.]+ [\d.]+ [\d.]+ after", sec_a
    )
    assert "bench_a.py --quick`" in sec_a  # --help lists --quick: the short run
    assert "args: ['--quick']\na vs b: 2.50x  ```fence``` inside\n" in sec_a  # verbatim
    assert "````text" in sec_a  # a fence longer than the output's backticks
    assert "FAILED" not in sec_a
    assert "bench_b.py`" in sec_b and "--quick" not in sec_b
    assert "**FAILED: exit status 3.**" in sec_b
    assert "partial line" in sec_b and "broke because the broker is missing" in sec_b


def test_report_refuses_an_empty_directory(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "_report.py"),
            "--benchmarks",
            str(tmp_path),
            "--out",
            str(tmp_path / "p.md"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "--benchmarks DIR" in r.stderr
    assert not (tmp_path / "p.md").exists()


def test_benchmarks_page_is_generated() -> None:
    page = (DOCS / "benchmarks.md").read_text()
    assert "benchmarks/_report.py" in page and "`make bench` regenerates this page" in page


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
@pytest.mark.parametrize("prog", PROGRAMS)
def test_completion_script_names_the_program(shell: str, prog: str) -> None:
    from edgellm.cli import main

    r = CliRunner().invoke(main, ["completion", shell, "--command", prog])
    assert r.exit_code == 0, r.output
    assert "_{}_COMPLETE".format(prog.replace("-", "_").upper()) in r.output
    assert prog in r.output


@pytest.mark.parametrize(
    "prog,partial,expected",
    [("edgellm", "rep", "repo"), ("edgellm-agent", "prov", "provision"), ("edgellm-server", "rollo", "rollout")],
)
def test_completion_answers_from_the_real_command(prog: str, partial: str, expected: str) -> None:
    """What the printed script does at a TAB: call the program back with the completion variable set."""
    var = "_{}_COMPLETE".format(prog.replace("-", "_").upper())
    env = dict(os.environ, COMP_WORDS=f"{prog} {partial}", COMP_CWORD="1", **{var: "bash_complete"})
    code = f"import sys; from {_cli(prog).callback.__module__} import main; sys.argv[0] = {prog!r}; main()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert f"plain,{expected}" in r.stdout.splitlines(), r.stdout + r.stderr


def leaf_commands() -> list[tuple[list[str], click.Command]]:
    """([program, group, ..., command], command) of every leaf command of the three programs."""
    found: list[tuple[list[str], click.Command]] = []

    def walk(path: list[str], cmd: click.Command) -> None:
        if isinstance(cmd, click.Group):
            for name, sub in sorted(cmd.commands.items()):
                walk([*path, name], sub)
        else:
            found.append((path, cmd))

    for prog in PROGRAMS:
        walk([prog], _cli(prog))
    return found


def example_lines(cmd: click.Command) -> list[str]:
    """The command lines of a command's "Example:" epilog, continuation lines joined."""
    body = (cmd.epilog or "").partition("\b\n")[2]
    return [line for _, line in shell_lines("```bash\n" + textwrap.dedent(body) + "\n```\n")]


def test_every_leaf_command_shows_an_example_that_runs_it() -> None:
    leaves = leaf_commands()
    assert len(leaves) >= 60, [" ".join(p) for p, _ in leaves]
    problems = []
    for path, cmd in leaves:
        name = " ".join(path)
        if not (cmd.epilog or "").startswith("Example:\n\n\b\n"):
            problems.append(f"{name}: no Example: epilog")
            continue
        calls = [argv for line in example_lines(cmd) for argv in invocations(line)]
        if not calls or any(argv[: len(path)] != path for argv in calls):
            problems.append(f"{name}: the example does not run {name}: {calls}")
        problems += [f"{name}: example: {p}" for argv in calls for p in check(argv)]
    assert not problems, "\n".join(problems)


def test_the_example_shows_in_help() -> None:
    from agent.cli import main

    r = CliRunner().invoke(main, ["provision", "--help"], terminal_width=80)
    assert r.exit_code == 0, r.output
    example = r.output.split("Example:", 1)[1]
    assert "edgellm-agent provision --data-dir /var/lib/edgellm-agent --device-id arm-07" in example  # not rewrapped


def test_add_examples_refuses_a_command_that_does_not_exist() -> None:
    from edgellm._click import add_examples

    group = click.Group("g", commands=[click.Command("real")])
    with pytest.raises(KeyError, match="no command 'real nope'"):
        add_examples(group, {"real nope": "g real"})
    add_examples(group, {"real": "g real --x"})
    assert group.commands["real"].epilog == "Example:\n\n\b\n  g real --x"
