"""pyproject.toml is the one place dependencies are declared, and `pip wheel .` gives a complete wheel."""
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_dependencies_and_extras_are_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert {"mindspore==2.10.0", "numpy>=1.25,<2", "pyyaml>=6"} <= set(project["dependencies"])
    assert any(d.startswith("matplotlib") for d in project["optional-dependencies"]["demo"])
    assert {"pytest", "hypothesis"} <= {d.split(">")[0] for d in project["optional-dependencies"]["test"]}
    # run.sh installs exactly these declarations; there is no second list
    assert not (REPO / "requirements.txt").exists()
    assert '-e ".[test,demo]"' in (REPO / "run.sh").read_text()


def test_wheel_holds_the_kernels_and_the_op_definitions(tmp_path):
    # In-tree build without isolation: reuses the object files of the editable install in build/.
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
                             "--disable-pip-version-check", "-q", "-w", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = tmp_path.glob("ms_nsa-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"ms_nsa/libms_nsa_cpu.so", "ms_nsa/ops_yaml/nsa_select_attention.yaml",
            "ms_nsa/ops_yaml/nsa_select_attention_grad.yaml", "ms_nsa/functional.py"} <= names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Dist: mindspore==2.10.0" in metadata
    assert 'Requires-Dist: matplotlib>=3.8; extra == "demo"' in metadata
