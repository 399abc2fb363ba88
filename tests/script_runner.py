"""Run `python scripts/<name>.py ARGS` in this process (torch is imported once): for the many error-path cases."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def run_script(name: str, *args, monkeypatch, capsys) -> tuple[int, list[str]]:
    """(exit status, non-empty lines of stdout + stderr) of `python scripts/<name>.py ARGS`, run in this process
    exactly as the command line would (`runpy` with `__main__`, the script's own `sys.exit(main())`)."""
    script = SCRIPTS / f"{name}.py"
    monkeypatch.setattr(sys, "argv", [str(script), *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    captured = capsys.readouterr()
    return exit_info.value.code, [line for line in (captured.out + captured.err).splitlines() if line.strip()]
