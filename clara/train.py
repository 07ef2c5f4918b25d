"""`python -m clara.train`: train one CLaRa stage (see --help)."""

from __future__ import annotations

import contextlib
import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from clara.cli import parse_config
from clara.config import resolve, validate
from clara.data.fingerprint import check_base_model
from clara.data.spec import check_data_settings
from clara.errors import exit_status
from clara.locks import INFO_ENV, holding


def own_lock(save_path: str) -> contextlib.AbstractContextManager:
    """Rank 0 of a run started without a launcher holds SAVE_PATH itself (a launcher holds it for its run)."""
    if os.environ.get(INFO_ENV) or int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return holding(save_path, "python -m clara.train")


@record
def main(argv: list[str] | None = None) -> int:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = resolve(parse_config(argv), world_size=world_size)

    def body() -> int | None:
        validate(cfg, world_size=world_size)
        check_data_settings(cfg.dataset, cfg.eval_dataset)
        # The launchers check (and warn) before starting the processes; a run without one checks here.
        quiet = bool(os.environ.get(INFO_ENV)) or int(os.environ.get("RANK", "0")) != 0
        check_base_model(cfg.model_path, cfg.pretrain_checkpoint, warn=(lambda line: None) if quiet else None)
        with own_lock(cfg.save_path):
            # Deferred: a bad flag (or a SAVE_PATH in use) is reported before deepspeed, peft and the model load.
            from clara.training.signals import Stop
            from clara.training.trainer import train

            try:
                train(cfg)
            except Stop as stop:
                return 128 + stop.signum
        return None

    # A DataError marked `reported` (a rank that waited for the one that prints it) is not printed again.
    return exit_status(body)


if __name__ == "__main__":
    sys.exit(main())
