"""The only executor a job may use at a Portico site: the pre-installed trainer, with checked arguments.

A job names the model package, the cohort and a few hyper-parameters; it cannot point at a script,
a command or a path. This class is on the site's component allow-list; NVFlare's general
``ClientAPIExecutor`` is not.
"""

from __future__ import annotations

import re
from pathlib import Path

from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor

TASK_SCRIPT = Path(__file__).with_name("train_task.py")
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class PorticoTrainer(ClientAPIExecutor):  # type: ignore[misc]
    """Train the named package's architecture on the named local cohort (NVFlare Client API, in process)."""

    def __init__(self, model: str, cohort: str = "default", steps: int = 20, lr: float = 1e-3,
                 batch_size: int = 8, image_size: int = 64, spacing_mm: float = 8.0,
                 seed: int = 0) -> None:
        if not NAME.match(str(model)) or not NAME.match(str(cohort)):
            raise ValueError("model and cohort must be plain names")
        for name, value, low, high in (("steps", steps, 1, 10_000), ("batch_size", batch_size, 1, 256),
                                       ("image_size", image_size, 16, 1024), ("seed", seed, 0, 2**31 - 1)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}]")
        if not isinstance(lr, (int, float)) or not 0 < float(lr) < 1:
            raise ValueError("lr must be in (0, 1)")
        if not isinstance(spacing_mm, (int, float)) or not 0.1 <= float(spacing_mm) <= 20:
            raise ValueError("spacing_mm must be in [0.1, 20]")
        # the same names as the arguments: NVFlare's job exporter reads them back
        self.model, self.cohort, self.steps, self.lr = model, cohort, steps, float(lr)
        self.batch_size, self.image_size, self.seed = batch_size, image_size, seed
        self.spacing_mm = float(spacing_mm)
        super().__init__(
            execution_mode="in_process", task_script_path=str(TASK_SCRIPT),
            task_script_args=(f"--model {model} --cohort {cohort} --steps {steps} --lr {float(lr)!r} "
                              f"--batch-size {batch_size} --image-size {image_size} --spacing-mm {float(spacing_mm)!r} "
                              f"--seed {seed}"),
            params_exchange_format="pytorch")
