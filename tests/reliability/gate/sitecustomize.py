"""Test plugin, loaded only by processes whose PYTHONPATH starts with this folder.

With ``RUNGWISE_TEST_GATE=DIR`` set, ``trainer.loop.fit`` is wrapped as soon as that module is
imported (a trial worker imports it when the trial starts). While the folder DIR exists (the
gate is armed), the first call goes ahead and every later call waits until ``DIR/go`` exists;
without the folder every call goes ahead. A sweep with one trial at a time then cannot end
before the test has done what it waits to do (send a signal), however fast or loaded the
machine is. Nothing of this is in the product.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time
from pathlib import Path

GATE = os.environ.get("RUNGWISE_TEST_GATE")


def _arrival(folder: Path) -> int:
    n = 0
    while True:
        try:
            os.close(os.open(folder / f"claim-{n:04d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return n
        except FileExistsError:
            n += 1


def _wrap(module: object) -> None:
    folder = Path(GATE or ".")
    fit = module.fit  # type: ignore[attr-defined]

    def gated_fit(*args: object, **kwargs: object) -> object:
        if folder.is_dir() and _arrival(folder) > 0:  # no folder: the gate is not armed
            while not (folder / "go").exists():
                time.sleep(0.1)
        return fit(*args, **kwargs)

    module.fit = gated_fit  # type: ignore[attr-defined]


class _WrapOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: object, target: object = None) -> object:
        if name != "trainer.loop":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: object) -> None:
            run(module)  # type: ignore[arg-type]
            _wrap(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if GATE:
    sys.meta_path.insert(0, _WrapOnImport())
