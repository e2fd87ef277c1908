"""What every stage script shares: run its main, turn an expected failure into one line.

    if __name__ == "__main__":
        run_stage("extract", main)

A ``Speech2FaceError`` (speech2face.core.errors) prints ``extract: <message>`` on stderr
and exits with status 1; Ctrl-C exits with 130 and says that a rerun resumes. Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable

from speech2face.core.errors import Speech2FaceError


def run_stage(name: str, main: Callable[[], object]) -> None:
    try:
        main()
    except Speech2FaceError as error:
        message = str(error).strip() or type(error).__name__
        prefix = f"{name}: "
        sys.exit(message if message.startswith(prefix) else prefix + message)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; run it again to resume (finished work is kept)", file=sys.stderr)
        sys.exit(130)
