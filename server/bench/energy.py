"""GPU energy from NVML's cumulative energy counter (Volta and later); None where unavailable."""

from __future__ import annotations

from typing import Any


class EnergyMeter:
    """Reads GPU 0..n's total energy counters (millijoules) through NVML (``nvidia-ml-py``)."""

    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        self._nvml = nvml
        self._handles = handles

    @classmethod
    def open(cls) -> EnergyMeter | None:
        try:
            import pynvml  # from the nvidia-ml-py package

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            meter = cls(pynvml, handles)
            meter.read()
            return meter if handles else None
        except Exception:
            return None

    def read(self) -> float:
        """Total energy of all GPUs so far, in joules."""
        return sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles) / 1000.0

    def joules_since(self, before: float) -> float:
        return self.read() - before
