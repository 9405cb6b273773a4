"""The interface every inference runtime offers to :mod:`inference.predict` and the pipeline.

A runtime holds one loaded model and runs batches of patches through it. The tensor contract is the
same for every runtime: input ``(N, 1, z, y, x)`` float32 intensities scaled to ``[0, 1]``, output
``(N, C, z, y, x)`` float32 logits, where channel ``c`` is label ``c`` (channel 0 background).
"""

from __future__ import annotations

import abc

import numpy as np
from numpy.typing import NDArray

CPU_PROVIDER = "CPUExecutionProvider"


class Runtime(abc.ABC):
    """A loaded model ready to run batches of patches."""

    @classmethod
    @abc.abstractmethod
    def is_available(cls) -> bool:
        """Whether this runtime's library can be used in this process."""

    @property
    @abc.abstractmethod
    def provider(self) -> str:
        """The execution provider actually used (recorded per job)."""

    @abc.abstractmethod
    def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """Run one batch ``(N, 1, z, y, x)`` and return logits ``(N, C, z, y, x)``."""
