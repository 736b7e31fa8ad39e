"""What several `peftu` commands share: the base, store and hyper-parameter options, settings
models built from flags, and the logging set-up (also used by `jobs/`).

A flag made from a settings field (`add_fields`) takes its type, choices, default and help from
the model in `peftu.config`, so the CLI never repeats them.
"""

from __future__ import annotations

import argparse
import types
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from peftu.config import LoraHParams
from peftu.errors import PeftuError

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

    from peftu.data.schema import UserRecord
    from peftu.store import AdapterStore

M = TypeVar("M", bound=BaseModel)


# --- flags from settings models ------------------------------------------------------------


def comma_list(kind: type) -> Any:
    """An argparse type: "a,b,c" as a list of `kind`."""
    def parse(text: str) -> list:
        return [kind(item) for item in text.split(",") if item]
    parse.__name__ = f"comma-separated {kind.__name__}"  # what argparse names in a bad value's error
    return parse


def _plain(annotation: Any) -> Any:
    """The type under `X | None` and `Annotated[X, ...]`."""
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _help(info: FieldInfo, default: Any) -> str:
    """The field's description, then its default (none shown for flags, None and "")."""
    text = (info.description or "").strip().removesuffix(".")
    if default not in (None, "") and not isinstance(default, bool):
        text = f"{text} (default: {_shown(default)})" if text else f"default: {_shown(default)}"
    return text.replace("%", "%%")  # argparse formats help with %


def field_flag(info: FieldInfo, *, optional: bool = False) -> dict[str, Any]:
    """argparse keywords for one settings field: its type or choices, its default, its help.

    `optional`: the flag defaults to None (the field's default only shows in the help), so that
    what was not given can come from elsewhere (a tuned config) before the model's default.
    """
    kind, default = _plain(info.annotation), info.get_default(call_default_factory=True)
    flag: dict[str, Any] = {"help": _help(info, default)}
    if kind is bool:
        return flag | {"action": "store_true"}
    if get_origin(kind) is Literal:
        flag["choices"] = list(get_args(kind))
    elif get_origin(kind) is list:
        flag |= {"type": comma_list(_plain(get_args(kind)[0])), "metavar": "A,B,..."}
    else:
        flag["type"] = kind
    return flag | {"default": None if optional else default}


def add_fields(parser: argparse.ArgumentParser | argparse._ArgumentGroup, model: type[BaseModel],
               names: list[str] | None = None, *, optional: bool = False) -> None:
    """A `--field-name` flag for each of `names` (default: every field) of a settings model."""
    for name in names or list(model.model_fields):
        parser.add_argument("--" + name.replace("_", "-"), dest=name,
                            **field_flag(model.model_fields[name], optional=optional))


def given(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The values of `model`'s fields that were given as flags (`add_fields(optional=True)`)."""
    return {k: getattr(args, k) for k in model.model_fields if getattr(args, k, None) is not None}


def settings(model: type[M], **values: Any) -> M:
    """`model(**values)`, where what the model refuses is a `PeftuError` naming each bad field."""
    try:
        return model(**values)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'input'}: {err['msg']}" for err in e.errors())
        raise PeftuError(f"invalid {model.__name__}: {problems}") from None


# --- options of several commands ------------------------------------------------------------


def add_hparams(parser: argparse.ArgumentParser) -> None:
    """One option per LoRA / training hyper-parameter, from `LoraHParams` itself."""
    add_fields(parser.add_argument_group("LoRA and training hyper-parameters"), LoraHParams, optional=True)


def hparams(args: argparse.Namespace, under: LoraHParams | None = None) -> LoraHParams:
    """The hyper-parameters given as flags, over `under` (a tuned config) and the defaults."""
    return settings(LoraHParams, **(under.model_dump() if under else {}) | given(args, LoraHParams))


def add_base(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", help="base model: a local folder or a Hugging Face id "
                        "(default: the tiny base, built first if missing)")


def base_path(args: argparse.Namespace) -> str:
    from peftu.model.build import ensure_base

    return args.base or str(ensure_base())


def add_store(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", help="adapter store: a folder or s3://bucket/prefix "
                        "(default: $PEFTU_HOME/store)")
    add_endpoint(parser)


def add_endpoint(parser: argparse.ArgumentParser) -> None:
    """The S3-compatible endpoint every s3:// URI of the command (data set, store) is opened at."""
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, moto); "
                        "default: AWS_ENDPOINT_URL or AWS")


def store_uri(args: argparse.Namespace) -> str:
    from peftu.paths import peftu_home

    return args.store or str(peftu_home() / "store")


def open_store(args: argparse.Namespace) -> AdapterStore:
    from peftu.store import AdapterStore

    return AdapterStore.open(store_uri(args), endpoint_url=args.endpoint_url)


def add_outputs(parser: argparse.ArgumentParser, plot: str = "write the chart here (PNG)") -> None:
    """--plot PATH and --json, which the search and the benchmarks end with."""
    parser.add_argument("--plot", help=plot)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")


def first_users(users: list[UserRecord], limit: int | None) -> list[UserRecord]:
    return users[:limit] if limit else users
