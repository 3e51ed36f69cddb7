"""Test-wide settings: one thread for torch, Prefect's local API with its home in a temp dir."""

import logging
import os
import tempfile

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="sieve-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

torch.set_num_threads(1)

# Prefect logs "Stopping temporary server" at interpreter exit, after pytest has closed the
# captured stream it logs to; don't print a traceback for that.
logging.raiseExceptions = False
