"""The odd-file corpus in ``../shared/data``, sent with DCMTK: every file the sender sends gets a status.

Each file goes in its own association (``storescu -R`` plus the option that proposes its own transfer
syntax, so DCMTK sends it as it is). What DCMTK itself refuses to send (no SOP class in the file, not
DICOM at all, a transfer syntax it cannot propose) is the sender's business and only counted; what we
must never do is abort an association or leave a sent file without a C-STORE response.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from pydicom.filereader import read_file_meta_info

from dicom_router.scp import StorageSCP
from dicom_router.settings import Peer, RouterSettings
from tests.support.net import free_port
from tests.support.peers import echo
from tests.unit.dicom_router.memory_sink import FolderSink

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed")]

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")
#: storescu's option that proposes a file's own transfer syntax (besides the uncompressed ones)
PROPOSE = {
    "1.2.840.10008.1.2": "-xi", "1.2.840.10008.1.2.1": "-xe", "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd", "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx", "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu", "1.2.840.10008.1.2.5": "-xr",
}
CORPORA = ("pydicom", "pynetdicom", "dcmjs", "dcm_qa_ts")


def corpus(root: Path) -> list[tuple[Path, str]]:
    """Every file with a readable file meta, and the storescu option for its transfer syntax ('' if none)."""
    found = []
    for name in CORPORA:
        for path in sorted((root / name).rglob("*")):
            if not path.is_file() or path.stat().st_size > 64 << 20:
                continue
            try:
                syntax = str(read_file_meta_info(path).get("TransferSyntaxUID", ""))
            except Exception:  # not Part 10: DCMTK refuses it itself
                syntax = ""
            found.append((path, PROPOSE.get(syntax, "")))
    return found


def test_every_file_dcmtk_sends_gets_a_status(real_data: Path, tmp_path: Path) -> None:
    port = free_port()
    sink = FolderSink(tmp_path)
    scp = StorageSCP(RouterSettings(port=port, peers=(Peer(ae_title="STORESCU"), Peer(ae_title="PYSCU"))), sink)
    scp.start()
    outcomes: Counter[str] = Counter()
    unanswered: list[str] = []
    try:
        for path, option in corpus(real_data):
            if not option:
                outcomes["not proposable by storescu"] += 1
                continue
            run = subprocess.run(["storescu", "-v", "-R", option, "-aet", "STORESCU", "-aec", "PORTICO",
                                  "127.0.0.1", str(port), str(path)],
                                 env=DCMTK_ENV, capture_output=True, text=True, timeout=60, check=False)
            out = run.stdout + run.stderr
            if "Received Store Response" in out:
                outcomes["answered"] += 1
            elif any(text in out for text in ("missing SOP class", "Bad DICOM file", "No presentation context",
                                              "cannot change to", "no valid Presentation Context")):
                outcomes["refused by the sender"] += 1
            else:
                unanswered.append(f"{path.relative_to(real_data)}: {out.strip().splitlines()[-1:]}")
        assert echo(port, "PYSCU"), "the listener is still up"
    finally:
        scp.stop()
    print(f"odd corpus: {dict(outcomes)}; stored {len(sink.instances)}, duplicates {sink.duplicates}, "
          f"quarantined {len(sink.quarantined)}")
    assert not unanswered, unanswered
    assert outcomes["answered"] >= 100, outcomes
    # every answered file is stored or quarantined: nothing acknowledged or refused is lost
    assert len(sink.instances) + sink.duplicates + len(sink.quarantined) >= outcomes["answered"], outcomes
