"""notebooks/quickstart.ipynb runs headless, top to bottom, with smaller parameters injected
after its `parameters` cell (as papermill does), in a kernel on this interpreter without the
tests' XLA_FLAGS: it sets up 8 CPU devices itself, trains, writes the loss plots, compiles the
USP step and prints a sample and a finite loss."""
import json
import math
import pathlib
import re
import sys

import nbformat
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"
KERNEL = "lcjax-test-python"


def _kernel_spec(root: pathlib.Path) -> pathlib.Path:
  """A kernel spec running this interpreter's ipykernel, so the notebook sees the same venv
  whatever kernels the machine has registered."""
  spec = root / "kernels" / KERNEL
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "lcjax tests", "language": "python"}))
  return root


def _outputs(nb, output_type, field):
  return [o[field] for cell in nb.cells if cell.cell_type == "code"
          for o in cell.get("outputs", []) if o["output_type"] == output_type and field in o]


def test_quickstart_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("JUPYTER_PATH", str(_kernel_spec(tmp_path / "jupyter")))
  monkeypatch.delenv("XLA_FLAGS")  # the notebook's own cell must ask for the 8 CPU devices
  nb = nbformat.read(NOTEBOOK, as_version=4)
  where = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(where) == 1, "the notebook needs exactly one cell tagged 'parameters'"
  workdir = tmp_path / "run"
  injected = nbformat.v4.new_code_cell(
      f"steps = 20\nseq_len = 64\neval_every = 10\nusp_seq_len = 256\nsample_tokens = 24\n"
      f"workdir = {str(workdir)!r}")
  injected.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(where[0] + 1, injected)

  NotebookClient(nb, kernel_name=KERNEL, timeout=300,
                 resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

  text = "".join(_outputs(nb, "stream", "text"))
  assert "8 cpu devices" in text
  for name in ("loss.png", "tokens_per_s.png", "memory.png"):
    assert (workdir / name).read_bytes()[:4] == b"\x89PNG"
    assert str(workdir / name) in text
  assert len([d for d in _outputs(nb, "display_data", "data") if "image/png" in d]) == 3
  loss = re.search(r"step 20: train loss (\S+), held-out loss (\S+) nats/token", text)
  assert loss and all(math.isfinite(float(x)) for x in loss.groups()), text
  assert "compile/temp_bytes" in text and "USP: data=2 x ring=2 x ulysses=2" in text, text
  sample = (workdir / "sample.txt").read_text()
  assert sample.startswith("def ") and f"--- sample.txt ---\n{sample}" in text
  assert (tmp_path / "run_usp" / "metrics.jsonl").is_file()
