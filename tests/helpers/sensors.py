"""The prompt-files sensor evaluated tick by tick, as the sensor daemon would.

Example:
    >>> daemon = Daemon(instance, tmp_path / "prompts", tmp_path / "output")
    >>> result = daemon.tick()
    >>> added_keys(result), run_requests(result)
"""

from __future__ import annotations

import logging
from pathlib import Path

from dagster import (
    AddDynamicPartitionsRequest,
    DagsterInstance,
    RunRequest,
    SensorResult,
    build_sensor_context,
)

from flux2_pipeline.assets import Flux2Keys, build_flux2_definitions
from flux2_pipeline.resources import Flux2Storage


class Daemon:
    """Evaluates the sensor the way the sensor daemon does, one tick at a time."""

    def __init__(self, instance: DagsterInstance, input_dir: Path, output_dir: Path) -> None:
        self.instance = instance
        self.storage = Flux2Storage(input_dir=str(input_dir), output_dir=str(output_dir))
        self.cursor: str | None = None
        self.log_handler: logging.Handler | None = None

    def tick(self) -> SensorResult:
        context = build_sensor_context(
            instance=self.instance, resources={"flux2_storage": self.storage}, cursor=self.cursor
        )
        if self.log_handler is not None:
            context.log.addHandler(self.log_handler)  # the sensor's logger is not global
        sensor = build_flux2_definitions().get_unresolved_sensor_def(Flux2Keys().sensor_name)
        result = sensor(context)
        assert isinstance(result, SensorResult)
        for request in result.dynamic_partitions_requests or []:
            assert isinstance(request, AddDynamicPartitionsRequest)
            assert request.partitions_def_name == Flux2Keys().partitions_name
            self.instance.add_dynamic_partitions(
                Flux2Keys().partitions_name, request.partition_keys
            )
        self.cursor = result.cursor
        return result

    @property
    def partitions(self) -> list[str]:
        return sorted(self.instance.get_dynamic_partitions(Flux2Keys().partitions_name))


def added_keys(result: SensorResult) -> list[str]:
    """The partition keys the tick asked to add, sorted."""
    keys: list[str] = []
    for request in result.dynamic_partitions_requests or []:
        assert isinstance(request, AddDynamicPartitionsRequest)
        keys.extend(request.partition_keys)
    return sorted(keys)


def run_requests(result: SensorResult) -> list[RunRequest]:
    """The runs the tick requested."""
    return list(result.run_requests or [])
