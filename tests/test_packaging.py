"""Packaging of the transformers autoload hook and the lm-eval task configs: the editable install
that `make venv` does, and a regular wheel (built from a copy of the sources)."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTH_LINE = "import tacq_kernels_autoload; tacq_kernels_autoload.install()\n"


def test_this_install_has_the_autoload_pth():
    """The environment running the tests (make venv: `pip install -e .`) runs the hook at start-up."""
    path = os.path.join(sysconfig.get_paths()["purelib"], "tacq_kernels_autoload.pth")
    with open(path) as f:
        assert f.read() == PTH_LINE
    assert "tacq_kernels_autoload" in sys.modules  # site ran it before pytest started


def test_wheel_ships_the_hook_and_the_tasks(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "tacq_kernels_autoload.py"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
    shutil.copytree(os.path.join(ROOT, "tacq_kernels"), src / "tacq_kernels", ignore=ignore)
    shutil.copytree(os.path.join(ROOT, "python"), src / "python", ignore=ignore)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("tacq_kernels-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert z.read("tacq_kernels_autoload.pth").decode() == PTH_LINE
        record = z.read(next(n for n in names if n.endswith(".dist-info/RECORD"))).decode()
    assert "tacq_kernels_autoload.py" in names and "tacq_kernels_autoload.pth," in record
    for task in ("tacq_piqa", "tacq_piqa_all", "tacq_wikitext", "tacq_wikitext_all"):
        assert f"tacq_quant/lm_eval_tasks/{task}.yaml" in names
    assert "tacq_quant/lm_eval_tasks/tacq_data.py" in names
