"""Entry point of a spawned tensor-parallel rank: ``python -m common.engine.tensor_parallel_worker PORT``.

A module of its own so that the messages it unpickles are ``common.engine.tensor_parallel``'s classes, not
``__main__``'s."""

from __future__ import annotations

import logging
import sys

from common.engine.tensor_parallel import worker_main

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s tp-worker %(levelname)s %(name)s: %(message)s")
    sys.exit(worker_main(int(sys.argv[1])))
