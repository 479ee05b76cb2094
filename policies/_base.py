"""Shared pydantic base and field types for the policy schema and the licence catalogue."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints

from ._files import check_relative_name


class Strict(BaseModel):
    """Frozen, strict, closed schema object: unknown fields are errors, no type coercion."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
GitSha = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{40}$")]
HfRepo = Annotated[str, StringConstraints(pattern=r"^[\w.-]+/[\w.-]+$", max_length=200)]
#: lower-case identifier (declared uses, prohibited-use categories, acknowledgements)
Ident = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,63}$")]
#: SPDX id or LicenseRef-*
LicenseId = Annotated[str, StringConstraints(pattern=r"^(?:LicenseRef-[A-Za-z0-9.-]+|[A-Za-z0-9][A-Za-z0-9.+-]*)$")]
Text = Annotated[str, StringConstraints(min_length=1, max_length=4000)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]


def _relative(value: str) -> str:
    try:
        return check_relative_name(value)
    except ValueError as err:
        raise ValueError(f"{err} (paths are relative to the model folder; no '..', no leading '/')") from None


RelPath = Annotated[str, StringConstraints(max_length=500), AfterValidator(_relative)]
