"""Pool workers that exit when the benchmark that started them dies.

A ProcessPoolExecutor worker keeps training after its parent is killed (SIGKILL, a closed
terminal), holding the cores for nothing; this initializer makes it follow its parent.
"""
from __future__ import annotations

import os
import threading
import time


def die_with_parent(poll_seconds: float = 2.0) -> None:
    """Pool ``initializer``: a daemon thread ends this process once its parent is gone."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()
