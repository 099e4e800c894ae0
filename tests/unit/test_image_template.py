"""scripts/cpu-image.Dockerfile.j2 renders through BentoML's own Dockerfile generator into a
Dockerfile without compilers or package caches (scripts/build_image.sh builds the image from it)."""

from pathlib import Path

from tests.conftest import ROOT


def render(tmp_path: Path, monkeypatch, template: str | None) -> str:
    from bentoml._internal.bento.build_config import CondaOptions, DockerOptions
    from bentoml._internal.container.generate import generate_containerfile

    monkeypatch.chdir(ROOT)  # BentoML resolves the template under the working directory
    docker = DockerOptions(python_version="3.11", dockerfile_template=template).with_defaults()
    return generate_containerfile(docker=docker, build_ctx=str(ROOT), conda=CondaOptions(), bento_fs=tmp_path, enable_buildkit=False)


def test_the_cpu_image_installs_no_compilers_and_keeps_no_uv_cache(tmp_path, monkeypatch):
    default = render(tmp_path, monkeypatch, None)
    assert "build-essential" in default  # what BentoML's Debian template adds (≈0.55 GB with the kept .deb files)
    lean = render(tmp_path, monkeypatch, "scripts/cpu-image.Dockerfile.j2")
    assert "apt-get" not in lean and "build-essential" not in lean
    assert "ENV UV_NO_CACHE=1" in lean.split("install.sh")[0]  # set before the install step
    # Everything else is BentoML's: its user, venv, install script, the Bento's files, entrypoint.
    for step in (
        "useradd",
        "uv venv",
        "bash -euxo pipefail /home/bentoml/bento/env/python/install.sh",
        "COPY --chown=bentoml:bentoml . ./",
    ):
        assert step in lean, step
    assert lean.strip().endswith('ENTRYPOINT [ "/home/bentoml/bento/env/docker/entrypoint.sh" ]')
