"""A module slow to import in processes given SHOAL_TEST_SLOW_IMPORT
(seconds): a stand-in for a heavy library (test_api.py)."""

import os
import time

time.sleep(float(os.environ.get("SHOAL_TEST_SLOW_IMPORT", "0")))
