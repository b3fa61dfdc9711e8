"""The README's PyTorch example runs as shown (it is extracted from README.md, not copied)."""

import re
import subprocess
import sys

from conftest import REPO


def _example():
    text = (REPO / "README.md").read_text()
    section = text.split("\n## PyTorch\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "expected one python example in the README's PyTorch section"
    return blocks[0]


def test_readme_example_runs(tmp_path):
    script = tmp_path / "readme_example.py"
    script.write_text(_example())
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, f"README example failed:\n{res.stdout}\n{res.stderr}"
    assert "step 1: loss" in res.stdout and "decode vs prefill" in res.stdout
