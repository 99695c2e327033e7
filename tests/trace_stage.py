"""Run one stage script as `python stages/<name>.py` runs it, and record what it used.

    python tests/trace_stage.py <report.json> stages/<name>.py [stage arguments...]

The report lists the files of every module the stage imported and every params key it read (an
attribute of the object `siamese_cv.config.params.load_params` returned), with the stage's exit
status. Only the standard library is imported before the stage, so every project module in the
report is one the stage imported itself. Used by tests/test_dependencies.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import runpy
import sys
from importlib.abc import MetaPathFinder
from pathlib import Path

PARAMS_MODULE = "siamese_cv.config.params"


def _fields(cls: type) -> set[str]:
    """The field names of a params section class (pydantic or dataclass); empty for other types."""
    fields = getattr(cls, "model_fields", None)
    if isinstance(fields, dict):
        return set(fields)
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


class ParamsRecorder(MetaPathFinder):
    """When the params module is imported, wrap its `load_params` so that every field read of the
    returned sections (`params.train.lr`, `vars(section)`, `section.model_dump()`) is recorded
    as a dotted key. Reads made while loading (validation) are not: they are not the stage's."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self._owner: dict[int, str] = {}  # id of a loaded section -> its key prefix
        self._patched: set[type] = set()

    def find_spec(self, name, path, target=None):
        if name != PARAMS_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            load = module.load_params

            def load_params(*args, **kwargs):
                params = load(*args, **kwargs)
                self._watch(params, "")
                return params

            module.load_params = load_params

        spec.loader.exec_module = exec_and_wrap
        return spec

    def _watch(self, section: object, prefix: str) -> None:
        cls = type(section)
        self._owner[id(section)] = prefix
        if cls not in self._patched:
            self._patch(cls)
        for name in _fields(cls):
            value = object.__getattribute__(section, name)
            if _fields(type(value)):
                self._watch(value, f"{prefix}{name}.")

    def _read_all(self, section: object) -> None:
        """Record every key of `section` and of the sections inside it."""
        prefix = self._owner.get(id(section))
        if prefix is None:
            return
        for name in _fields(type(section)):
            value = object.__getattribute__(section, name)
            if _fields(type(value)):
                self._read_all(value)
            else:
                self.keys.add(prefix + name)

    def _patch(self, cls: type) -> None:
        self._patched.add(cls)
        fields, owner, keys, read_all = _fields(cls), self._owner, self.keys, self._read_all
        original = cls.__getattribute__

        def getattribute(section, name):
            value = original(section, name)
            prefix = owner.get(id(section))
            if prefix is not None and name in fields and not _fields(type(value)):
                keys.add(prefix + name)
            elif prefix is not None and name == "__dict__":
                read_all(section)
            return value

        cls.__getattribute__ = getattribute
        for name in ("model_dump", "model_dump_json", "__iter__"):
            if hasattr(cls, name):
                setattr(cls, name, self._reading_all(getattr(cls, name)))
        for name in ("model_copy", "__copy__", "__deepcopy__"):
            if hasattr(cls, name):
                setattr(cls, name, self._copying(getattr(cls, name)))

    def _reading_all(self, method):
        def reading_all(section, *args, **kwargs):
            self._read_all(section)
            return method(section, *args, **kwargs)

        return reading_all

    def _copying(self, method):
        """A copy (`train.model_copy(update=...)`) is read as the section it copies."""

        def copying(section, *args, **kwargs):
            copy = method(section, *args, **kwargs)
            prefix = self._owner.get(id(section))
            if prefix is not None:
                self._watch(copy, prefix)
            return copy

        return copying


def main() -> None:
    report, script, *args = sys.argv[1:]
    recorder = ParamsRecorder()
    sys.meta_path.insert(0, recorder)
    sys.argv = [script, *args]
    sys.path[0] = str(Path(script).resolve().parent)  # as `python stages/<name>.py` has it
    try:
        runpy.run_path(script, run_name="__main__")
        status = 0
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else 1
    modules = sorted({f for m in list(sys.modules.values()) if (f := getattr(m, "__file__", None))})
    Path(report).write_text(
        json.dumps({"status": status, "modules": modules, "params": sorted(recorder.keys)})
    )
    sys.exit(status)


if __name__ == "__main__":
    main()
