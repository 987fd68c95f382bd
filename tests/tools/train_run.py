"""A ``ratel train`` run that sends itself SIGTERM during update ``STOP_AT`` (``python train_run.py CONFIG_JSON
STOP_AT [RANK]``), as a scheduler or a user's Ctrl-C would: the trainer must finish that update, save and stop.
Under torchrun, only rank ``RANK`` is signalled when given."""
from __future__ import annotations

import json
import os
import signal
import sys

import torch

from ratel.tools.train import TrainConfig, train

if __name__ == "__main__":
    config = TrainConfig(**json.loads(sys.argv[1]))
    stop_at = int(sys.argv[2])
    signalled = len(sys.argv) < 4 or os.environ.get("RANK", "0") == sys.argv[3]
    torch.set_num_threads(min(torch.get_num_threads(), 4))     # as conftest: the same arithmetic as the test

    def stop(record: dict) -> None:
        if record["step"] == stop_at and signalled:
            os.kill(os.getpid(), signal.SIGTERM)

    result = train(config, on_update=stop)
    sys.exit(0 if result.stopped_by is None else 128 + result.stopped_by)
