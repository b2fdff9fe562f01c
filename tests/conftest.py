import os
import sys

import mindspore as ms

sys.path.insert(0, os.path.dirname(__file__))

ms.set_device("CPU")

from modes import mode  # noqa: E402,F401  (the fixture)
