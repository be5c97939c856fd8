"""adaptive-lsgd: adaptive (hierarchical, post-) local SGD for Horovod."""
from setuptools import setup

setup(
    name="adaptive-lsgd",
    version="0.1.0",
    description="Adaptive hierarchical local SGD for Horovod: picks H per level from measured times",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["adaptive_lsgd", "adaptive_lsgd.integrations", "adaptive_lsgd.tools",
              "adaptive_lsgd.tools.cli", "adaptive_lsgd.tools.bench", "adaptive_lsgd.tools.cluster",
              "adaptive_lsgd.tools.demo"],  # tools/dev/ (set-up and dev scripts) is not installed
    package_dir={
        "adaptive_lsgd": "adaptive_lsgd",
        "adaptive_lsgd.integrations": "integrations",
        "adaptive_lsgd.tools": "tools",
    },
    package_data={"adaptive_lsgd.tools": ["inject/*.py"]},  # alsgd-run's sitecustomize hook
    install_requires=["numpy", "pyyaml"],
    extras_require={
        "torch": ["torch>=2.1", "horovod==0.28.1"],
        "tensorflow": ["tensorflow-cpu==2.15.1", "horovod==0.28.1"],
        "tools": ["psutil", "jsonschema", "tqdm", "matplotlib"],  # psutil: alsgd-tune profile
        "dev": ["pytest", "pytest-timeout", "hypothesis", "ruff", "mnist1d", "matplotlib", "tqdm",
                "jsonschema", "psutil"],
    },
    entry_points={
        "console_scripts": [
            "alsgd-tune=adaptive_lsgd.tools.cli.tune:main",
            "alsgd-run=adaptive_lsgd.tools.cli.run:main",
            "alsgd-bench=adaptive_lsgd.tools.bench.cli:main",
            "alsgd-sim=adaptive_lsgd.tools.cli.sim:main",
        ],
    },
)
