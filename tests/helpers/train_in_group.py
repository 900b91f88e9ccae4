"""One process of a data-parallel training, for tests/test_processes.py (run as a script, one per process).

``python train_in_group.py CONFIG_JSON RUNS_ROOT WEIGHTS_NPZ [COORDINATOR NUM_PROCESSES PROCESS_ID]``: train
``CONFIG_JSON`` (an ExperimentConfig) into ``RUNS_ROOT`` alone, or as process ``PROCESS_ID`` of a group, and
save the weights this process ends with to ``WEIGHTS_NPZ`` (a follower writes nothing else).
"""

from __future__ import annotations

import sys
from pathlib import Path

import keras
import numpy as np

from metaseg_tf.config import ExperimentConfig
from metaseg_tf.training.processes import ProcessGroup, announce, initialize, receive
from metaseg_tf.training.train import follow_run, train


class SaveWeights(keras.callbacks.Callback):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def on_train_end(self, logs: dict | None = None) -> None:
        np.savez(self.path, *[np.asarray(weight) for weight in self.model.get_weights()])


def main(argv: list[str]) -> int:
    config = ExperimentConfig.load(argv[0])
    runs_root, weights = Path(argv[1]), Path(argv[2])
    group = ProcessGroup(argv[3], int(argv[4]), int(argv[5]), timeout_s=120) if len(argv) > 3 else None
    if group is not None:
        initialize(group)
    if group is None or group.leader:
        train(config, runs_root, progress=False, callbacks=[SaveWeights(weights)])
        announce(None)
    else:
        follow_run(receive(), progress=False, callbacks=[SaveWeights(weights)])
        assert receive() is None
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
