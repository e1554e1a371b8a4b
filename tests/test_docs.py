"""The documentation: the API reference builds with warnings as errors, and every package's
docstring (what `help()` shows) names each public name it exports."""

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["vishwam", "vishwam.nn", "vishwam.nn.moe", "vishwam.kernels", "vishwam.parallel", "vishwam.model",
            "vishwam.config", "vishwam.tokenizer", "vishwam.data", "vishwam.train", "vishwam.hf"]


def test_api_reference_builds_strictly(tmp_path):
    if shutil.which("mkdocs") is None and importlib.util.find_spec("mkdocs") is None:
        pytest.fail("mkdocs is not installed: `pip install -e '.[dev]'` brings it")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    page = (tmp_path / "site" / "api" / "train" / "index.html").read_text(encoding="utf-8")
    assert "make_train_step" in page and "init_train_state" in page


@pytest.mark.parametrize("name", PACKAGES)
def test_package_docstring_names_its_public_api(name):
    package = importlib.import_module(name)
    public = getattr(package, "__all__", None)
    if public is None:
        public = [n for n, v in vars(package).items()
                  if not n.startswith("_") and getattr(v, "__module__", "").startswith(name + ".")]
    missing = [n for n in public if not n.startswith("__") and n not in (package.__doc__ or "")]
    assert not missing, f"{name}'s docstring does not mention {missing}"
