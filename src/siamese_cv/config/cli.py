"""`siamese-params`: check params.yaml, or apply a profile of overrides to it.

`apply` edits params.yaml in place, keeping its comments, exactly as `dvc exp run -S key=value`
would: DVC then sees ordinary parameter changes and reruns only the stages they touch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from siamese_cv.config.params import PARAMS_FILE, Params, load_params
from siamese_cv.core.errors import ParamsError, UserError, run_cli


def _parse_override(text: str) -> tuple[list[str], object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UserError(f"--set {text!r}: write it as section.key=value")
    return key.split("."), yaml.safe_load(value) if value else ""


def _flatten(mapping: dict, prefix: tuple[str, ...] = ()) -> list[tuple[list[str], object]]:
    items = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            items += _flatten(value, (*prefix, key))
        else:
            items.append(([*prefix, key], value))
    return items


def apply_overrides(params_path: Path, overrides: list[tuple[list[str], object]]) -> None:
    """Set each dotted key in params.yaml (comments kept), then validate the result.

    Raises:
        ParamsError: an override names an unknown key or an invalid value; the file is left as it was.
    """
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    original = params_path.read_text(encoding="utf-8")
    data = rt.load(original)
    for keys, value in overrides:
        node = data
        for key in keys[:-1]:
            if key not in node or not hasattr(node[key], "keys"):
                raise ParamsError(
                    f"{'.'.join(keys)}: unknown section {key!r}; known sections: "
                    + ", ".join(Params.model_fields)
                )
            node = node[key]
        if keys[-1] not in node:
            raise ParamsError(_unknown_key(keys, params_path))
        node[keys[-1]] = value
    from io import StringIO

    buffer = StringIO()
    rt.dump(data, buffer)
    params_path.write_text(buffer.getvalue(), encoding="utf-8")
    try:
        load_params(params_path)
    except ParamsError:
        params_path.write_text(original, encoding="utf-8")
        raise


def _unknown_key(keys: list[str], params_path: Path) -> str:
    """Why `keys` cannot be set: not a key of its section, or a key the file does not write."""
    section = Params.model_fields.get(keys[0]) if len(keys) == 2 else None
    fields = section.annotation.model_fields if section else {}  # type: ignore[union-attr]
    if keys[-1] in fields:
        return (
            f"{'.'.join(keys)}: {params_path} does not write this key; add it under "
            f"{keys[0]}: (default {fields[keys[-1]].get_default(call_default_factory=True)!r})"
        )
    known = f"; known keys of {keys[0]}: {', '.join(fields)}" if fields else ""
    return f"{'.'.join(keys)}: unknown key{known}"


def check_paths(params: Params, base_dir: Path) -> None:
    """The local paths params.yaml names exist: data.source (unless hf:), model.weights (a file).

    Relative paths are taken from `base_dir`, the project root the stages run in.
    """
    source = params.data.source.strip()
    if not source:
        raise ParamsError(
            "data.source: empty; give an image folder, a CSV manifest, or hf:<dataset id>"
        )
    if not source.startswith("hf:"):
        path = Path(source).expanduser()
        if not (path if path.is_absolute() else base_dir / path).exists():
            raise ParamsError(f"data.source: no such folder or CSV file {path}")
    if params.model.weights not in ("imagenet", "none"):
        path = Path(params.model.weights).expanduser()
        if not (path if path.is_absolute() else base_dir / path).is_file():
            raise ParamsError(f"model.weights: no such file {path}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="siamese-params", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate params.yaml (types, ranges, known keys, paths)")
    check.add_argument("--params", type=Path, default=Path(PARAMS_FILE))
    apply = sub.add_parser(
        "apply", help="write a profile's overrides (and --set key=value) into params.yaml"
    )
    apply.add_argument(
        "profile", type=Path, nargs="?", help="a YAML file of overrides, e.g. profiles/offline.yaml"
    )
    apply.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    apply.add_argument("--params", type=Path, default=Path(PARAMS_FILE))
    args = parser.parse_args(argv)
    if args.command == "check":
        check_paths(load_params(args.params), args.params.resolve().parent)
        print(f"{args.params}: ok")
        return 0
    overrides = []
    if args.profile:
        if not args.profile.is_file():
            raise UserError(f"{args.profile}: no such profile")
        overrides += _flatten(yaml.safe_load(args.profile.read_text(encoding="utf-8")) or {})
    overrides += [_parse_override(text) for text in args.set]
    apply_overrides(args.params, overrides)
    print(
        f"{args.params}: applied {len(overrides)} settings"
        + (f" from {args.profile}" if args.profile else "")
    )
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
