"""fastrit: exact neuron Integrated Gradients and neuron-guided tuning kernels.

Install torch first, then this package with ``pip install --no-build-isolation -e .`` so that
anything compiled here builds against the torch already in the environment.
"""

from setuptools import setup

setup(
    name="fastrit",
    version="0.1.0",
    description="Neuron-level Integrated Gradients and neuron-guided tuning for RAG language models, fast on one GPU",
    python_requires=">=3.10",
    packages=["fastrit", "fastrit.attribution", "fastrit.ops", "fastrit.kernels"],
    package_dir={"fastrit.kernels": "kernels"},
    install_requires=[
        "torch>=2.6,<=2.14.1",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "numpy>=1.24",
        "bitsandbytes>=0.45",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "captum>=0.7",
            "matplotlib>=3.7",
            "ruff>=0.5",
        ],
    },
)
