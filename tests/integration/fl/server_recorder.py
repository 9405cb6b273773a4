"""Test-only NVFlare result filter for the *server*: keeps every result exactly as it arrived.

Loaded from the server kit's ``local/custom`` by the FL tests, so a test can inspect the bytes that
came from each site (no pixel data, no DICOM, no identifiers).
"""

import os
import pickle
import time

from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReservedKey
from nvflare.fuel.utils import fobs


class ResultRecorder(Filter):
    def __init__(self, out_dir):
        super().__init__()
        self.out_dir = out_dir

    def process(self, shareable, fl_ctx):
        os.makedirs(self.out_dir, exist_ok=True)
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer else "unknown"
        name = f"{time.time():.6f}-{site}-{fl_ctx.get_prop(ReservedKey.TASK_NAME, 'task')}"
        try:
            data = fobs.dumps(shareable)
        except Exception:
            data = pickle.dumps(dict(shareable))
        with open(os.path.join(self.out_dir, name + ".bin"), "wb") as fh:
            fh.write(data)
        return shareable
