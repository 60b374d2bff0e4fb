"""Entry point of one engine-core process."""

from __future__ import annotations

import logging
import sys

from engine.config import EngineConfig
from engine.cpu_threads import configure_openmp


def run_engine(config: EngineConfig) -> int:
    configure_openmp()  # before engine.core imports torch
    from engine.core import EngineCore

    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s [{config.engine_id}] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        core = EngineCore(config)
    except (ValueError, FileNotFoundError, OSError) as exc:
        logging.getLogger(__name__).error("engine failed to start: %s", exc)
        return 2
    core.install_signal_handlers()
    core.run()
    return 0
