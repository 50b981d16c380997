"""experiments/quickstart.ipynb runs top to bottom, headless on the CPU, within two minutes.

Marked `serial`: `make test` runs it alone after the parallel part of the suite, so that its time limit
measures the notebook and not the load of other tests on a 2-core machine.
"""

import os
import time

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.serial


def test_quickstart_notebook_runs_top_to_bottom_within_two_minutes():
    nb = nbformat.read(os.path.join(ROOT, "experiments", "quickstart.ipynb"), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": ROOT}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on any cell's error
    assert time.perf_counter() - start < 120
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the kept-positions plot and the needle sweep
