"""Test-wide settings: every test session gets its own instance label and queue.

Set before anything imports the Celery config, so the client in this process
and the workers the tests start agree, and a developer's running stack
(instance "local") is never touched.
"""

import os
import uuid

RUN_ID = uuid.uuid4().hex[:8]
os.environ.setdefault("NANOGRID_INSTANCE", f"test-{RUN_ID}")
os.environ.setdefault("NANOGRID_QUEUE", f"nanogrid-test-{RUN_ID}")
