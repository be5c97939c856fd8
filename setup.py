"""adaptive-lsgd: adaptive (hierarchical, post-) local SGD for Horovod."""
from setuptools import setup

setup(
    name="adaptive-lsgd",
    version="0.1.0",
    description="Adaptive hierarchical local SGD for Horovod: picks H per level from measured times",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["adaptive_lsgd", "adaptive_lsgd.integrations", "adaptive_lsgd.tools"],
    package_dir={
        "adaptive_lsgd": "adaptive_lsgd",
        "adaptive_lsgd.integrations": "integrations",
        "adaptive_lsgd.tools": "tools",
    },
    package_data={"adaptive_lsgd.tools": ["*.sh", "inject/*.py"]},
    install_requires=["numpy", "psutil", "pyyaml"],
    extras_require={
        "torch": ["torch>=2.1", "horovod==0.28.1"],
        "tensorflow": ["tensorflow-cpu==2.15.1", "horovod==0.28.1"],
        "tools": ["jsonschema", "tqdm", "matplotlib"],
        "dev": ["pytest", "pytest-timeout", "hypothesis", "ruff", "mnist1d", "matplotlib", "tqdm",
                "jsonschema"],
    },
    entry_points={
        "console_scripts": [
            "alsgd-tune=adaptive_lsgd.tools.tune:main",
            "alsgd-run=adaptive_lsgd.tools.run:main",
            "alsgd-bench=adaptive_lsgd.tools.bench:main",
        ],
    },
)
