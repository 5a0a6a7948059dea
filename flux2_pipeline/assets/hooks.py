"""The `execute` hook: code of the user's own around each materializing step.

`build_flux2_definitions(execute=...)` and `Flux2EditsComponent.execute` run each step of
flux2_edits, flux2_images and flux2_training_dataset through it. A hook gets the asset's
name, the step's context and `step`, which runs the step and yields its events; the
default yields them unchanged.

Example::

    def logged(name, context, step):
        context.log.info(f"{name}: starting")
        yield from step()
        context.log.info(f"{name}: done")

    defs = build_flux2_definitions(..., execute=logged)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeAlias

from dagster import AssetExecutionContext

ExecuteHook: TypeAlias = Callable[
    [str, AssetExecutionContext, Callable[[], Iterator[Any]]], Iterator[Any]
]
"""`execute(name, context, step)`: runs `step()` (the step's events), yields the events."""


def default_execute(
    name: str, context: AssetExecutionContext, step: Callable[[], Iterator[Any]]
) -> Iterator[Any]:
    """Run the step as the factory built it."""
    yield from step()


def with_execute(
    name: str, execute: ExecuteHook | None
) -> Callable[[Callable[..., Any]], Callable[..., Iterator[Any]]]:
    """A decorator (under the asset decorator) that runs the step through `execute`.

    The body's return value, if it is not an iterator of events, becomes one event.
    """
    hook = execute or default_execute

    def decorate(body: Callable[..., Any]) -> Callable[..., Iterator[Any]]:
        def events(context: AssetExecutionContext, **kwargs: Any) -> Iterator[Any]:
            result = body(context, **kwargs)
            if isinstance(result, Iterator):
                yield from result
            elif result is not None:
                yield result

        # `wraps` keeps the body's signature, which Dagster reads for its config parameter.
        @functools.wraps(body)
        def step(context: AssetExecutionContext, **kwargs: Any) -> Iterator[Any]:
            yield from hook(name, context, lambda: events(context, **kwargs))

        return step

    return decorate
