"""Maps the repository layout onto one import package, ``trapline``.

``src/trapline`` holds what every service shares (runtime, generated API stubs, CLI);
``services/<name>`` holds each service and is imported as ``trapline.<name>``.
Metadata and extras live in pyproject.toml; only the package map is here, since it is computed.
"""

from setuptools import find_packages, setup

SERVICES = ("detector", "embedder", "selector", "trainer", "orchestrator")
ROOTS = {"trapline": "src/trapline", **{f"trapline.{s}": f"services/{s}" for s in SERVICES}}

packages: list[str] = []
for name, path in ROOTS.items():
    packages.append(name)
    packages.extend(f"{name}.{sub}" for sub in find_packages(path))

setup(
    package_dir=ROOTS,
    packages=packages,
    package_data={
        "": ["*.pyi", "py.typed", "*.json", "*.sql"],
        # bundled default models (not packages: no __init__.py), so a wheel carries them too
        "trapline.detector": ["models/*/*.onnx", "models/*/*.json"],
        "trapline.embedder": ["default_model/*/*.onnx", "default_model/*/*.json", "default_model/*/*.npz"],
    },
)
