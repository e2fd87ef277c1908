"""run_stage: an expected failure is one line and exit 1, a bug keeps its traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def _stage(body: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        from speech2face.core.errors import DataError, Speech2FaceError
        from speech2face.core.params import ParamsError
        from speech2face.core.stage import run_stage

        def main():
            {body}

        run_stage("evaluate", main)
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("body, line", [
    ("raise DataError('the split has no test pairs')", "evaluate: the split has no test pairs"),
    ("raise ParamsError('params.yaml: evaluate.draws = 0: expected an integer >= 1')",
     "evaluate: params.yaml: evaluate.draws = 0: expected an integer >= 1"),
    # a message that names the stage already is not prefixed twice
    ("raise Speech2FaceError('evaluate: no encoder')", "evaluate: no encoder"),
])
def test_expected_failures_are_one_line(body: str, line: str) -> None:
    done = _stage(body)
    assert done.returncode == 1
    assert done.stderr.strip() == line


def test_a_bug_keeps_its_traceback() -> None:
    done = _stage("raise ValueError('a bug')")
    assert done.returncode == 1 and "Traceback" in done.stderr and "ValueError: a bug" in done.stderr


def test_interrupt_says_a_rerun_resumes() -> None:
    done = _stage("raise KeyboardInterrupt")
    assert done.returncode == 130
    assert done.stderr.strip() == "evaluate: interrupted; run it again to resume (finished work is kept)"


def test_success_is_silent() -> None:
    done = _stage("print('evaluate: 3 done')")
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "evaluate: 3 done", "")
