"""What every worker process of a Ray instance that a job starts locally runs first (`worker_process_setup_hook`,
set by actors.hosts.init_ray). Imports nothing heavy: Ray's own helper actors run it too."""

from __future__ import annotations

import logging

# Ray Train's detached placement-group cleaner asks Ray's state API, once a second, whether the train controller
# still lives, and warns each time the API does not answer. The state API is served by the dashboard, which a local
# instance runs without (about 1 GB less memory). There the cleaner has nothing to do: a local instance ends with
# its driver, placement groups and all. Its warnings were 48 lines in a two-step tiny SAPO run, one a second.
QUIET_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def local_worker_setup() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
